#!/usr/bin/env bash
# The demo: sets up, builds, installs the GIMP plug-in and the shipped
# weights into a staged folder inside out/, and runs the main job in
# gimp-console-2.10 with that installed plug-in:
#   out/grid.png                 10x10, one row per class, classifier-free
#   out/interpolation.png (.gif) 8 frames between two seeds, side by side
#   out/class-guided/*.png       samples guided by the noisy classifier
# Never touches your GIMP profile: GIMP2_DIRECTORY is out/gimp, made afresh.
#
# Settings (environment): BUILD_DIR (build-demo), STEPS (30 DDIM steps),
# SCALE (3, classifier-free), CLF_SCALE (classifier guidance scale, 10),
# CLF_COUNT (samples per class with the classifier, 4), SEED (1),
# TILE (56 pixels a sample in the grid and the strip).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

build=${BUILD_DIR:-build-demo}
steps=${STEPS:-30}
scale=${SCALE:-3}
clf_scale=${CLF_SCALE:-10}
clf_count=${CLF_COUNT:-4}
seed=${SEED:-1}
tile=${TILE:-56}

out=$root/out
prefix=$out/prefix
gimpdir=$out/gimp
weights=$prefix/share/diffuse/weights
log=$out/gimp-console.log

die () { echo "demo: error: $*" >&2; exit 1; }
now () { date +%s.%N; }
since () { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

for v in steps clf_count seed tile; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "${v^^} must be a whole number, not '${!v}'"
done
steps=$((10#$steps)) clf_count=$((10#$clf_count)) seed=$((10#$seed)) tile=$((10#$tile))
[ "$tile" -ge 1 ] || die "TILE must be at least 1"
for v in scale clf_scale; do
  [[ ${!v} =~ ^[0-9]+(\.[0-9]*)?$ ]] || die "${v^^} must be a number, not '${!v}'"
done
case $out in
  *[\"\\]*) die "the checkout's path $out has a quote or backslash, which" \
                "Script-Fu strings cannot hold: move the checkout" ;;
esac
t_start=$(now)

# 1. Packages, then a build with the plug-in, configured to install into
#    the staged folders (an existing build dir is re-pointed there).
bash scripts/setup.sh
command -v gimp-console-2.10 >/dev/null \
  || die "gimp-console-2.10 is not on PATH: install the 'gimp' package"
mkdir -p "$out"
setup_log=$out/meson-setup.log
opts=(-Dplugin=enabled "--prefix=$prefix" "-Dgimp-plugin-dir=$gimpdir/plug-ins")
configured () {
  meson introspect --buildoptions "$build" 2>/dev/null | python3 -c '
import json, sys
o = {x["name"]: x["value"] for x in json.load(sys.stdin)}
print(o["plugin"], o["prefix"], o["gimp-plugin-dir"])'
}
if [ -f "$build/build.ninja" ]; then
  # Re-pointing costs a regeneration: only when something differs.
  [ "$(configured || true)" = "enabled $prefix $gimpdir/plug-ins" ] \
    || meson configure "$build" "${opts[@]}" >"$setup_log" 2>&1 \
    || { cat "$setup_log" >&2; die "meson configure $build failed"; }
else
  meson setup "$build" "${opts[@]}" >"$setup_log" 2>&1 \
    || { tail -n 20 "$setup_log" >&2; die "meson setup $build failed (log: $setup_log)"; }
fi
ninja -C "$build" >/dev/null || die "the build failed: run 'ninja -C $build' to see why"

# 2. Install into a fresh staged prefix and GIMP folder.  The trainer
#    replaces the shipped weights atomically, so the copies installed here
#    are whole files and stay the same for the whole run.
rm -rf "$prefix" "$gimpdir" "$out/grid.png" "$out/interpolation.png" \
  "$out/interpolation.gif" "$out/class-guided" "$out/demo.scm" "$log"
mkdir -p "$out/class-guided"
install_staged () { meson install -C "$build" --no-rebuild >/dev/null; }
missing_weights () {
  for w in fashion-mnist fashion-mnist-classifier; do
    [ -f "$weights/$w.safetensors" ] || { echo "$w"; return 0; }
  done
  return 1
}
install_staged || die "meson install -C $build failed"
if missing_weights >/dev/null; then
  # The weights are listed when meson configures: pick up new ones.
  meson setup --reconfigure "$build" "${opts[@]}" >"$setup_log" 2>&1 \
    || { tail -n 20 "$setup_log" >&2; die "meson setup --reconfigure $build failed"; }
  install_staged || die "meson install -C $build failed"
fi
if w=$(missing_weights); then
  die "weights/$w.safetensors is missing: train it first (README, 'Training')"
fi
[ -x "$gimpdir/plug-ins/diffuse/diffuse" ] \
  || die "the plug-in was not installed into $gimpdir/plug-ins/diffuse"
# GIMP saves its gradients there on exit; it complains if it is missing.
mkdir -p "$gimpdir/gradients"
echo "demo: installed the plug-in in $gimpdir/plug-ins/diffuse and the weights in $weights"

# 3. The Script-Fu job.  Settings first, then the program (quoted, so the
#    shell leaves it alone).
{
  printf '(define out-dir "%s")\n' "$out"
  printf '(define steps %d)\n(define seed %d)\n(define tile %d)\n' \
    "$steps" "$seed" "$tile"
  printf '(define cfg-scale %s)\n(define clf-scale %s)\n(define clf-count %d)\n' \
    "$(printf '%.3f' "$scale")" "$(printf '%.3f' "$clf_scale")" "$clf_count"
} >"$out/demo.scm"
cat >>"$out/demo.scm" <<'SCHEME'
; Progress goes to gimp-console's stderr through gimp-message.
(define (say . xs)
  (gimp-message (apply string-append "demo: "
                       (map (lambda (x) (if (number? x) (number->string x) x))
                            xs))))
(define (now) (let ((t (gettimeofday))) (+ (car t) (/ (cadr t) 1000000.0))))
(define (secs t0) (/ (round (* 10 (- (now) t0))) 10))
(define (path . parts) (apply string-append out-dir "/" parts))
(define (save-png img drawable file)
  (file-png-save-defaults RUN-NONINTERACTIVE img drawable file file))

(define class-names
  #("T-shirt/top" "Trouser" "Pullover" "Dress" "Coat"
    "Sandal" "Shirt" "Sneaker" "Bag" "Ankle boot"))
(define class-files
  #("tshirt-top" "trouser" "pullover" "dress" "coat"
    "sandal" "shirt" "sneaker" "bag" "ankle-boot"))

; Lays out the layers ids (a list of vectors, one a row) as a grid of
; tile x tile cells on img, flattens it and saves it as a PNG.
(define (save-grid img rows file)
  (let ((ncols (vector-length (car rows))))
    (gimp-image-resize img (* ncols tile) (* (length rows) tile) 0 0)
    (let row-loop ((r 0) (rs rows))
      (when (pair? rs)
        (let col-loop ((c 0))
          (when (< c ncols)
            (gimp-layer-set-offsets (vector-ref (car rs) c)
                                    (* c tile) (* r tile))
            (col-loop (+ c 1))))
        (row-loop (+ r 1) (cdr rs))))
    (let ((flat (car (gimp-image-flatten img))))
      (save-png img flat file))))

(define t-all (now))

; The grid: one row per class, the same seeds in every row, so a column
; shows one noise image guided to each class in turn.
(let* ((img (car (gimp-image-new tile tile GRAY)))
       (t0 (now))
       (rows
        (let loop ((k 0) (acc '()))
          (if (= k 10)
              (reverse acc)
              (let* ((t1 (now))
                     (r (plug-in-diffusion-class-guided
                         RUN-NONINTERACTIVE img -1 "" k 10 steps 0.0 seed
                         0 cfg-scale "")))
                (say "grid row " k " (" (vector-ref class-names k) "): "
                     (car r) " samples in " (secs t1) " s")
                (loop (+ k 1) (cons (cadr r) acc)))))))
  (save-grid img rows (path "grid.png"))
  (say "grid: 100 samples, DDIM " steps ", classifier-free guidance "
       cfg-scale ", in " (secs t0) " s -> " (path "grid.png"))
  (gimp-image-delete img))

; The interpolation: frames as layers named "(100ms)", exported as an
; animated GIF (the timing comes from the layer names), then side by side.
(let* ((img (car (gimp-image-new tile tile GRAY)))
       (t0 (now))
       (r (plug-in-diffusion-interpolate RUN-NONINTERACTIVE img -1 ""
                                         seed (+ seed 1) 8 steps -1))
       (ids (cadr r)))
  (say "interpolation: " (car r) " frames between seeds " seed " and "
       (+ seed 1) " in " (secs t0) " s")
  ; interlace 0, loop 1, default delay 100 ms, dispose 0 (unspecified).
  ; file-gif-save, not file-gif-save2: GIMP 2.10.34's save2 takes only
  ; URIs ("Operation not supported" for a path).
  (file-gif-save RUN-NONINTERACTIVE img (vector-ref ids 0)
                 (path "interpolation.gif") (path "interpolation.gif")
                 0 1 100 0)
  (save-grid img (list ids) (path "interpolation.png"))
  (say "interpolation -> " (path "interpolation.png") " and "
       (path "interpolation.gif"))
  (gimp-image-delete img))

; Classifier guidance: clf-count samples of every class, one PNG each at
; twice the grid's cell size.
(let ((t0 (now)))
  (let loop ((k 0))
    (when (< k 10)
      (let* ((img (car (gimp-image-new (* 2 tile) (* 2 tile) GRAY)))
             (t1 (now))
             (r (plug-in-diffusion-class-guided
                 RUN-NONINTERACTIVE img -1 "" k clf-count steps 0.0 seed
                 1 clf-scale ""))
             (ids (cadr r)))
        (let save-loop ((i 0))
          (when (< i (car r))
            (save-png img (vector-ref ids i)
                      (path "class-guided/" (number->string k) "-"
                            (vector-ref class-files k) "-"
                            (number->string i) ".png"))
            (save-loop (+ i 1))))
        (say "classifier guidance, " (vector-ref class-names k) ": "
             (car r) " samples in " (secs t1) " s")
        (gimp-image-delete img)
        (loop (+ k 1)))))
  (say "classifier guidance: " (* 10 clf-count) " samples, scale " clf-scale
       ", in " (secs t0) " s -> " (path "class-guided/")))

(say "Script-Fu job done in " (secs t-all) " s")
; The shell checks for this file: Script-Fu errors do not change
; gimp-console's exit status.
(let ((port (open-output-file (path "demo.done"))))
  (display "ok" port)
  (newline port)
  (close-output-port port))
SCHEME

# 4. Run it with the installed plug-in.  -i no interface, -d no brushes
#    and patterns, -f no fonts: the job needs none of them.  The plug-in's
#    own timings come from its debug messages.
echo "demo: running gimp-console-2.10 (DDIM $steps steps; log in $log)"
rm -f "$out/demo.done"
t_gimp=$(now)
status=0
GIMP2_DIRECTORY=$gimpdir DIFFUSE_WEIGHTS=$weights \
  G_MESSAGES_DEBUG=diffuse-plugin \
  timeout 1800 gimp-console-2.10 -i -d -f \
    -b "(load \"$out/demo.scm\")" -b '(gimp-quit 0)' </dev/null >"$log" 2>&1 &
gimp_pid=$!
# Show the job's progress lines as they come.
tail -n +1 -F --pid="$gimp_pid" "$log" 2>/dev/null \
  | sed -u -n 's/^script-fu-Warning: demo: /demo:   /p' &
tail_pid=$!
wait "$gimp_pid" || status=$?
wait "$tail_pid" 2>/dev/null || true
gimp_secs=$(since "$t_gimp")

if [ "$status" -ne 0 ] || [ ! -f "$out/demo.done" ]; then
  if [ "$status" -eq 124 ]; then
    why="was stopped after 30 minutes"
  elif [ "$status" -ne 0 ]; then
    why="failed with exit status $status"
  else
    why="ran, but the Script-Fu job stopped with an error"
  fi
  echo "demo: error: gimp-console-2.10 $why; the end of its log ($log):" >&2
  grep -v -e '-DEBUG: ' -e '^$' "$log" | tail -n 20 >&2 || true
  exit 1
fi
rm -f "$out/demo.done"
expected=("$out/grid.png" "$out/interpolation.png" "$out/interpolation.gif")
for f in "${expected[@]}"; do
  [ -s "$f" ] || die "gimp-console ran but did not write $f (see $log)"
done
n_clf=$(find "$out/class-guided" -name '*.png' | wc -l)
[ "$n_clf" -eq $((10 * clf_count)) ] \
  || die "expected $((10 * clf_count)) PNGs in $out/class-guided, found $n_clf (see $log)"

# 5. Timings and where the results are.
awk '/diffuse-plugin-DEBUG.* layers, engine / {
       for (i = 1; i <= NF; i++) {
         if ($i == "engine") engine += $(i + 1)
         if ($i == "run") run += $(i + 1)
       }
       calls++
     }
     END {
       if (calls)
         printf "demo: the plug-in took %.1f s over %d calls (engine %.1f s," \
                " the rest making layers)\n", run, calls, engine
     }' "$log"
echo "demo: gimp-console-2.10 took $gimp_secs s; the whole demo $(since "$t_start") s"
echo "demo: results in $out:"
echo "demo:   grid.png            10x10, a row per class (T-shirt/top first," \
     "Ankle boot last), classifier-free guidance $scale"
echo "demo:   interpolation.png   8 frames between seeds $seed and $((seed + 1))," \
     "side by side; interpolation.gif plays them"
echo "demo:   class-guided/       $n_clf PNGs, classifier guidance $clf_scale," \
     "$clf_count a class, named CLASS-NAME-SAMPLE.png, e.g. 7-sneaker-0.png"
