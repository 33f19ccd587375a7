# Sourced by scripts/gpu_bench_train.sh and scripts/gpu_owed.sh on a GPU machine, from the
# repository root: installs the packages staged by ../shared/tools/stage-gpu-wheels (unless
# SKIP_STAGE=1), then puts them and this checkout's packages on the path.
#
# Staging: the files of the .stage* folders carried with this call, and of those earlier calls
# copied to $STAGE (one .stage folder per call: a transfer is limited to 64 MiB and the machine
# stays warm only ~30 s between calls, so issue the calls back to back), are gathered in $STAGE;
# part.* are reassembled (cat part.* | tar x) and any other *.tar unpacked, both into $STAGE; then
# *.whl install into $SITE with pip --target and *.tar.xz / *.tar.gz / *.tgz (installed trees) are
# extracted into $SITE. A stamp in $SITE skips the work when the same parts were installed already.
#
# Path: $SITE first on PYTHONPATH (its bin/ on PATH), then siasam_fast and the kernels (as the
# package siasam_kernels, their installed name) through links in a folder of their own: the
# repository root stays off sys.path, where its kernels/ folder would shadow PyPI's `kernels`,
# which transformers probes. Needs: PY, say (a logging function); STAGE and SITE default to
# /tmp/stage and /tmp/site.
STAGE=${STAGE:-/tmp/stage}
SITE=${SITE:-/tmp/site}
mkdir -p "$STAGE" "$SITE"
if [ "${SKIP_STAGE:-0}" != 1 ]; then
  for d in .stage*; do
    [ -d "$d" ] && cp -n "$d"/* "$STAGE"/ 2>/dev/null
  done
  if compgen -G "$STAGE/part.*" >/dev/null || compgen -G "$STAGE/*.tar" >/dev/null; then
    stamp=$(ls -l "$STAGE"/part.* "$STAGE"/*.tar 2>/dev/null | md5sum | cut -c1-12)
    if [ "$(cat "$SITE/.staged" 2>/dev/null)" != "$stamp" ]; then
      say "unpacking the staged files into $STAGE, installing into $SITE"
      if compgen -G "$STAGE/part.*" >/dev/null; then
        (cd "$STAGE" && cat part.* | tar x) || say "warning: the staged parts are incomplete" \
          "(copy every .stage folder first); installing what was extracted"
      fi
      for pack in "$STAGE"/*.tar; do
        [ -f "$pack" ] && { tar xf "$pack" -C "$STAGE" || say "warning: $pack did not unpack"; }
      done
      if compgen -G "$STAGE/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
          "$STAGE"/*.whl || say "warning: some staged wheels did not install"
      fi
      for tree in "$STAGE"/*.tar.xz "$STAGE"/*.tar.gz "$STAGE"/*.tgz; do
        [ -f "$tree" ] && { tar xf "$tree" -C "$SITE" || say "warning: $tree did not extract"; }
      done
      echo "$stamp" > "$SITE/.staged"
    fi
  else
    say "no staged parts (.stage*/ or $STAGE): using what the image has"
  fi
fi
SIASAM_PATH=$(mktemp -d -t siasam_path.XXXX)  # under $TMPDIR, else /tmp
ln -s "$PWD/siasam_fast" "$SIASAM_PATH/siasam_fast"
ln -s "$PWD/kernels" "$SIASAM_PATH/siasam_kernels"
export PYTHONPATH="$SITE:$SIASAM_PATH${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
