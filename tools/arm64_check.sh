#!/usr/bin/env bash
# rar_edge's runtime on an emulated Debian arm64 system: a debootstrap root whose aarch64 programs the kernel
# runs through qemu-user-static (binfmt_misc), so pip, the compilers and Python inside it are the real
# arm64 builds. It checks that the install works as a Jetson user would run it and that results match
# x86-64; it says nothing about speed (everything is emulated, 10-50x slower than native).
#
#   sudo bash tools/arm64_check.sh [OUT]      (default OUT: artifacts/arm64; `make test-arm64`)
#
# Steps: (1) debootstrap the root once (Debian $SUITE, default bookworm: Python 3.11), (2) copy this checkout
# (tracked and untracked, not ignored files) and the cached MobileNet export into it, (3) pip install
# "rar-edge[cpu,jetson,dev]" from that copy (onnxruntime's aarch64 wheel, numpy<2 as on JetPack 6, hnswlib
# and the native module built from source) and time it, (4) run the runtime tests (ARM64_TESTS) there:
# the `family` fixture runs the native kernels as NEON and scalar, (5) tools/arm64_probe.py there and on this
# machine (classify + detect on the shared photos), compared field by field into OUT/compare.json.
#
# Environment: ARM64_ROOT (default /var/tmp/rar-arm64/root, kept between runs), SUITE, MIRROR, RAR_EDGE_SHARED
# (default ../shared, bind-mounted read-only), PYTHON (this machine's interpreter for the x86 probe, default
# .venv/bin/python), ARM64_TESTS (test files), JOBS (build parallelism, default 2), NICE (default 10).
# Exit 77 with the reason on stderr when something it needs is missing (tests/test_arm64_emulated.py skips).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
out="$(mkdir -p "${1:-artifacts/arm64}" && cd "${1:-artifacts/arm64}" && pwd)"
root="${ARM64_ROOT:-/var/tmp/rar-arm64/root}"
suite="${SUITE:-bookworm}"
mirror="${MIRROR:-http://deb.debian.org/debian}"
shared="$(cd "${RAR_EDGE_SHARED:-$repo/../shared}" 2>/dev/null && pwd || true)"
host_py="${PYTHON:-$repo/.venv/bin/python}"
jobs="${JOBS:-2}"
nice_n="${NICE:-10}"
# Not tests/test_detect.py: its case of 2000 boxes in one call alone ran for over 35 minutes emulated; the probe
# below detects on COCO128 photos instead.
tests="${ARM64_TESTS:-tests/test_native_search.py tests/test_native_logits.py tests/test_preprocess.py tests/test_boxes.py tests/test_manifest.py tests/test_memory.py tests/test_pipeline.py tests/test_runtime_imports.py}"

skip() { echo "arm64_check: SKIP: $*" >&2; exit 77; }
[ "$(id -u)" = 0 ] || skip "needs root (debootstrap, chroot and bind mounts)"
command -v debootstrap >/dev/null || skip "debootstrap is missing (apt install debootstrap)"
command -v qemu-aarch64-static >/dev/null || skip "qemu-aarch64-static is missing (apt install qemu-user-static binfmt-support)"
[ -n "$shared" ] && [ -d "$shared/data/flowers17" ] && [ -d "$shared/data/coco128" ] \
  || skip "the shared photos are absent (set RAR_EDGE_SHARED to the folder holding data/flowers17 and data/coco128)"
[ -f .cache/models/mobilenet/manifest.json ] || skip "no exported MobileNet in .cache/models/mobilenet (run tools/fetch_test_assets.sh)"
[ -x "$host_py" ] || skip "no Python for the x86 probe at $host_py (set PYTHON)"

# binfmt_misc lets the kernel hand every aarch64 program in the root (pip's compilers included) to qemu.
# A container without it could still run one program with `qemu-aarch64-static -L ROOT`, but the programs
# that one starts (pip's compilers) go to the kernel, which cannot run them; proot -q qemu-aarch64-static
# re-wraps every exec and would be the way there (not done here). So: a skip with the reason.
bf=/proc/sys/fs/binfmt_misc
[ -e "$bf/status" ] || mount -t binfmt_misc binfmt_misc "$bf" 2>/dev/null \
  || skip "binfmt_misc is not mounted and cannot be mounted here (no CAP_SYS_ADMIN?)"
[ -e "$bf/qemu-aarch64" ] || update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
grep -q '^enabled' "$bf/qemu-aarch64" 2>/dev/null || skip "no enabled qemu-aarch64 entry in $bf (update-binfmts --enable qemu-aarch64)"
if ! grep -q '^flags:.*F' "$bf/qemu-aarch64"; then  # without F the interpreter is looked up inside the root
  interp="$(sed -n 's/^interpreter //p' "$bf/qemu-aarch64")"
  [ -n "$interp" ] && install -D "$(readlink -f "$interp")" "$root$interp"
fi

echo "== arm64 root: $root"
if [ ! -x "$root/usr/bin/python3" ]; then
  t0=$SECONDS
  nice -n "$nice_n" debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,python3-dev,g++,make,ca-certificates "$suite" "$root" "$mirror" >"$out/debootstrap.log" 2>&1 \
    || { tail -20 "$out/debootstrap.log"; exit 1; }
  echo "debootstrap: $((SECONDS - t0)) s" | tee "$out/debootstrap_time.txt"
fi

mounted=()
cleanup() { local m; for m in "${mounted[@]}"; do umount -l "$m" 2>/dev/null || true; done; }
trap cleanup EXIT
bind() {  # bind SRC DEST [ro]
  mkdir -p "$root$2"
  mountpoint -q "$root$2" && umount -l "$root$2"
  mount --bind "$1" "$root$2"
  mounted=("$root$2" "${mounted[@]}")
  [ "${3:-}" = ro ] && mount -o remount,bind,ro "$root$2"
  return 0
}
mkdir -p "$root/proc"
mountpoint -q "$root/proc" || { mount -t proc proc "$root/proc"; mounted=("$root/proc" "${mounted[@]}"); }
bind /dev /dev
# No /sys: ONNX Runtime's cpuinfo then warns that it cannot read the CPU lists and carries on, while with this
# machine's /sys (x86 CPUs) bound in, importing onnxruntime crashed with SIGSEGV under qemu (seen 2026-12-04).
bind "$shared" /shared ro
bind "$out" /out
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
# The CA bundle this machine trusts (a TLS-inspecting proxy's CA included), so pip in the root reaches the index.
cp -L "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$root/etc/ssl/certs/host-ca-certificates.crt"

# This checkout as it is now (other people's uncommitted work included), without build outputs.
rm -rf "$root/src" && mkdir -p "$root/src/.cache/models"
git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$root/src"
cp -r .cache/models/mobilenet "$root/src/.cache/models/"

cat >"$root/run-check.sh" <<'EOF'
set -uo pipefail
export HOME=/root LC_ALL=C.UTF-8 HNSWLIB_NO_NATIVE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
cd /  # never the checkout: Python would import /src/rar_edge (no compiled module) instead of the installed one
echo "machine: $(uname -m); $(python3 --version)"
[ -x /opt/venv/bin/python ] || python3 -m venv /opt/venv
py=/opt/venv/bin/python
$py -m pip uninstall -y -q rar-edge 2>/dev/null
t0=$(date +%s.%N)
if ! $py -m pip install --progress-bar off "/src[cpu,jetson,dev]" >/out/pip.log 2>&1; then
  tail -30 /out/pip.log; echo '{"install_ok": false}' >/out/arm64.json; exit 1
fi
t1=$(date +%s.%N)
$py -m pip freeze >/out/pip-freeze.txt
# What the extras resolve to on aarch64: markers are evaluated by the interpreter that runs pip, so this needs
# an aarch64 Python (pip --platform on x86 picks aarch64 wheels but still evaluates markers as x86).
$py -m pip install --dry-run --ignore-installed --report /out/dryrun-gpu.json "/src[gpu]" >/out/dryrun-gpu.log 2>&1
$py -m pip install --dry-run --ignore-installed --no-deps --report /out/dryrun-onnxruntime-gpu.json onnxruntime-gpu \
  >/out/dryrun-onnxruntime-gpu.log 2>&1
$py -m pip install --dry-run --ignore-installed --report /out/dryrun-jetson-bench.json "/src[cpu,jetson,bench]" \
  >/out/dryrun-jetson-bench.log 2>&1
# Does -march=armv8.2-a+dotprod (the Makefile's llama.cpp CPU flags on aarch64) turn on the dot product?
dot_base=$(echo | gcc -march=armv8-a -dM -E - | grep -c __ARM_FEATURE_DOTPROD || true)
dot_flag=$(echo | gcc -march=armv8.2-a+dotprod -dM -E - | grep -c __ARM_FEATURE_DOTPROD || true)
t2=$(date +%s.%N)
# The CLI tests start `python -m rar_edge` in the working directory: / keeps it on the installed package.
paths=(); for t in $ARM64_TESTS; do paths+=("/src/$t"); done
(RAR_EDGE_SHARED=/shared /opt/venv/bin/pytest -q -p no:cacheprovider --rootdir=/src -c /src/pyproject.toml \
  "${paths[@]}" --junitxml=/out/junit.xml >/out/pytest.log 2>&1)
rc_tests=$?
t3=$(date +%s.%N)
$py /src/tools/arm64_probe.py --encoder /src/.cache/models/mobilenet --shared /shared >/out/probe_arm64.json 2>/out/probe_arm64.log
rc_probe=$?
t4=$(date +%s.%N)
$py - "$t0" "$t1" "$t2" "$t3" "$t4" "$rc_tests" "$rc_probe" "$dot_base" "$dot_flag" <<'PY'
import json, platform, re, sys, xml.etree.ElementTree as ET
import numpy, onnxruntime, rar_edge
from rar_edge import _native
t0, t1, t2, t3, t4 = map(float, sys.argv[1:6])
rc_tests, rc_probe, dot_base, dot_flag = map(int, sys.argv[6:10])
suite = ET.parse("/out/junit.xml").getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
cases = list(suite.iter("testcase"))
bad = [f"{c.get('classname')}::{c.get('name')}" for c in cases if c.find("failure") is not None or c.find("error") is not None]
neon = [c for c in cases if re.search(r"[\[-]neon(_dot)?[\]-]", c.get("name", ""))
        and not any(c.find(t) is not None for t in ("failure", "error", "skipped"))]
def dry(name):
    try:
        rep = json.load(open(f"/out/dryrun-{name}.json"))
    except (OSError, ValueError):
        return None
    return sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in rep["install"])
json.dump({
    "install_ok": True, "machine": platform.machine(), "python": platform.python_version(),
    "install_s": round(t1 - t0, 1), "tests_s": round(t3 - t2, 1), "probe_s": round(t4 - t3, 1),
    "tests": n, "tests_failed": bad, "tests_neon_passed": len(neon), "pytest_rc": rc_tests, "probe_rc": rc_probe,
    "numpy": numpy.__version__, "onnxruntime": onnxruntime.__version__, "rar_edge_file": rar_edge.__file__,
    "native": _native.build_info(),
    "gcc_dotprod_define": {"-march=armv8-a": dot_base, "-march=armv8.2-a+dotprod": dot_flag},
    "dry_run": {name: dry(name) for name in ("gpu", "onnxruntime-gpu", "jetson-bench")},
}, open("/out/arm64.json", "w"), indent=1, default=str)
PY
tail -3 /out/pytest.log
EOF

echo "== install, tests and probe inside the root (emulated; this takes a while)"
# A clean environment: nothing of this machine's pip configuration (local x86 wheel folders) leaks in.
nice -n "$nice_n" env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin TERM=dumb \
  ARM64_TESTS="$tests" CMAKE_BUILD_PARALLEL_LEVEL="$jobs" PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt \
  SSL_CERT_FILE=/etc/ssl/certs/host-ca-certificates.crt chroot "$root" /bin/bash /run-check.sh \
  || { echo "arm64_check: the emulated run failed; see $out/*.log" >&2; exit 1; }

echo "== the same probe on this machine ($(uname -m))"
"$host_py" tools/arm64_probe.py --encoder .cache/models/mobilenet --shared "$shared" >"$out/probe_x86.json"
"$host_py" - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
a, x = (json.loads((out / f).read_text()) for f in ("probe_arm64.json", "probe_x86.json"))
def diff(key, fields):
    pairs = list(zip(a[key], x[key]))
    same = {f: sum(p[f] == q[f] for p, q in pairs) for f in fields}
    dscore = max(abs(p["score"] - q["score"]) for p, q in pairs)
    return {"n": len(pairs), "n_arm64": len(a[key]), "n_x86": len(x[key]), "equal": same, "max_score_diff": dscore,
            "differing": [{"arm64": p, "x86": q} for p, q in pairs if p["label"] != q["label"]]}
cmp = {"machines": [a["machine"], x["machine"]], "native_arm64": a["native"], "pixels_equal": a["pixels"] == x["pixels"],
       "classify": diff("classify", ("photo", "label", "candidates")),
       "detect": diff("detect", ("image", "truth", "label", "candidates"))}
(out / "compare.json").write_text(json.dumps(cmp, indent=1))
s = json.loads((out / "arm64.json").read_text())
print(f"arm64: install {s['install_s']} s, tests {s['tests']} in {s['tests_s']} s, probe {s['probe_s']} s;"
      f" native {s['native'].get('compiled')} selected {s['native'].get('selected')}; numpy {s['numpy']}")
for k in ("classify", "detect"):
    c = cmp[k]
    print(f"{k}: {c['equal']['label']}/{c['n']} labels and {c['equal']['candidates']}/{c['n']} candidate lists equal"
          f" to x86, max |score diff| {c['max_score_diff']:.2e}")
print("model input pixels equal:", cmp["pixels_equal"])
PY
