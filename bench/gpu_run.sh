#!/usr/bin/env bash
# The GPU run of issue 11, in one device call (recipe: shared/notes/gpu.md).
#
#   bench/gpu_run.sh prepare     on this (CPU) machine, once: wheels for the GPU machine's Python 3.12
#                                into .whl/ (about 55 MB; .git/info/exclude keeps them out of git)
#   bench/gpu_run.sh device      on the GPU machine, through the `run` tool, carry [".whl"], e.g.
#       run(command="bash bench/gpu_run.sh device", carry=[".whl"], timeout_s=600)
#
# `device` works under a deadline (DEADLINE seconds, default 570) and writes everything under $OUT:
#   summary.txt            one line per stage: what ran, its exit code, how long it took
#   nvidia-smi.txt, install.log, build_exllamav{2,3}.log
#   tests_gpu.log          tests/gpu (every GPU engine vs transformers in fp16, with the diagnosis)
#   fixtures/              bench/gpu_record.py: result dicts, logits, meta (copy into tests/fixtures/gpu/)
#   bench.log, bench.json  bench/gpu.py (the table and the targets; copy bench.json into the fixtures)
# Stages, in order of value: install; tests and bench of the cuda engine (no build needed, the CPUs
# still idle); then exllamav3 and exllamav2 build side by side (JIT, minutes; cached in .torch_ext/,
# which a warm machine keeps for a second call); their tests; the recorder; their bench; the devnet.
# A stage that does not fit in the time left is skipped and says so. `device STAGE...` runs only
# those stages (install always): install cuda builds libs record bench_libs devnet.
set -u
cd "$(dirname "$0")/.."

PY312=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64)
# The project's runtime closure minus what the GPU machine has (torch, transformers and their needs),
# plus the GPU libraries. fastecdsa (cp311-only, a C extension) and pytvm (cp311-tagged, but ctypes
# only) are handled in `device`.
WHEELS=(
  aioquic==1.7.2 annotated-types==0.8.0 anyio==4.16.0 async-generator==1.10 attrs==26.1.0 base58==2.1.1
  bitarray==3.12.3 blake3==1.0.11 cbor2==6.3.0 cffi==2.1.1 coincurve==21.0.0 cryptography==50.0.2
  dcap-qvl==0.7.0 dnspython==2.9.2 gguf==0.19.0 h11==0.16.0 h2==4.4.1 hpack==4.2.0 httpcore==1.0.9
  httpx==0.28.1 Hypercorn==0.18.0 hyperframe==6.1.0 idna==3.20 ifaddr==0.2.0 lazy-importer==0.1.0
  libp2p==0.8.1 lru-dict==1.4.1 miniupnpc==2.3.3 mmh3==5.3.1 morphys==1.0 msgpack==1.2.4
  multiaddr==0.2.0 netaddr==1.3.0 noiseprotocol==0.3.1 outcome==1.3.0.post0 priority==2.0.0
  prometheus_client==0.26.0 protobuf==6.33.6 psutil==7.2.2 py-cid==0.5.0 py-multibase==2.0.0
  py-multicodec==1.0.0 py-multihash==3.0.0 pycparser==3.12 pycryptodome==4.5.0 pycryptodomex==3.24.2
  pydantic==2.14.4 pydantic_core==2.50.5 pylsqpack==1.0.0 PyNaCl==1.6.2 pyOpenSSL==26.4.0
  pytest-trio==0.8.0 pytoniq==0.1.43 pytoniq-core==0.2.1 rpcudp==5.0.1 service-identity==26.1.0
  six==1.17.0 sniffio==1.3.1 sortedcontainers==2.4.0 trio==0.35.0 trio-typing==0.10.0
  trio-websocket==0.12.2 truststore==0.10.5 typing-inspection==0.4.5 u-msgpack-python==2.8.0
  wsproto==1.3.2 x25519==0.0.2 zeroconf==0.150.5
  exllamav2==0.3.2 exllamav3==1.6.5 marisa-trie==1.4.1 websockets pillow
)
# always ours, even where the machine has another version
FORCE="trio outcome sniffio pytest-trio attrs exllamav2 exllamav3"

prepare() {
  grep -qxF "/.whl/" .git/info/exclude || echo "/.whl/" >> .git/info/exclude
  grep -qxF "/.torch_ext/" .git/info/exclude || echo "/.torch_ext/" >> .git/info/exclude
  mkdir -p .whl
  local pip=(python3 -m pip)
  [ -x .venv/bin/python ] && pip=(.venv/bin/python -m pip)
  for w in "${WHEELS[@]}"; do
    "${pip[@]}" download -q --no-deps "${PY312[@]}" -d .whl "$w" || { echo "cannot download $w"; return 1; }
  done
  # pure-Python packages published as sdists only: build their wheels here
  "${pip[@]}" wheel -q --no-deps -w .whl python-baseconv==1.2.2 varint==1.0.2 || return 1
  # pytvm: its only wheel is tagged cp311, but holds Python and a ctypes library; unzipped on the GPU
  "${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
    --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 -d .whl pytvm==0.0.14 || return 1
  du -sh .whl
  local kb; kb=$(du -sk .whl | cut -f1)
  [ "$kb" -lt 60000 ] || { echo ".whl is ${kb} KB: over what travels (64 MiB with the tree)"; return 1; }
}

# ------------------------------------------------------------------------------------------ device

OUT=${OUT:-/tmp/gpu-run-out}
DEADLINE=${DEADLINE:-570}
T0=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
note() { echo "$*" | tee -a "$OUT/summary.txt"; }

# stage NAME NEEDED_SECONDS COMMAND... : run it under the time left (or skip it), log to $OUT/NAME.log
stage() {
  local name=$1 need=$2; shift 2
  local t; t=$(left)
  if [ "$t" -lt "$need" ]; then note "$name: skipped, ${t} s left (needs ~${need} s)"; return 0; fi
  local s; s=$(date +%s)
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  note "$name: rc $rc in $(( $(date +%s) - s )) s"
  return 0
}

install() {
  mkdir -p /tmp/site
  python3 - "$FORCE" <<'PY' > "$OUT/install.log" 2>&1
import importlib.metadata as md, pathlib, re, subprocess, sys, zipfile
force = set(sys.argv[1].split())
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
have = {norm(d.metadata["Name"]) for d in md.distributions() if d.metadata["Name"]}
wheels, unzip = [], []
for w in sorted(pathlib.Path(".whl").glob("*.whl")):
    name = norm(w.name.split("-")[0])
    if name in have and name not in force:
        print("present:", name)
    elif "-cp311-" in w.name:
        unzip.append(w)
    else:
        wheels.append(str(w))
subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                "--target", "/tmp/site", *wheels], check=True)
for w in unzip:  # pytvm: Python + a ctypes .so, fine on 3.12
    zipfile.ZipFile(w).extractall("/tmp/site")
    print("unzipped:", w.name)
PY
  local rc=$?
  if ! PYTHONPATH=/tmp/site python3 -c "import fastecdsa" 2>/dev/null; then
    # libp2p imports fastecdsa (secp256r1 keys, for secio) at import time; cocoon-node never uses
    # those keys (Ed25519 + Noise), and fastecdsa 2.3.2 has no wheel for Python 3.12: a stub that
    # raises if anything ever calls it.
    mkdir -p /tmp/site/fastecdsa/encoding
    cat > /tmp/site/fastecdsa/__init__.py <<'PY'
"""A stub installed by bench/gpu_run.sh: fastecdsa has no wheel here and cocoon-node never uses ECDSA."""
class _Missing:
    def __init__(self, *a, **k):
        raise RuntimeError("fastecdsa is a stub on this machine (bench/gpu_run.sh)")
    def __call__(self, *a, **k):
        raise RuntimeError("fastecdsa is a stub on this machine (bench/gpu_run.sh)")
def __getattr__(name):
    return _Missing
PY
    for m in curve keys point encoding/sec1 encoding/util; do
      printf 'from fastecdsa import _Missing\ndef __getattr__(name):\n    return _Missing\n' \
        > "/tmp/site/fastecdsa/$m.py"
    done
    printf 'from fastecdsa import _Missing\n' > /tmp/site/fastecdsa/encoding/__init__.py
    echo "fastecdsa: stub" >> "$OUT/install.log"
  fi
  note "install: rc $rc"
}

device() {
  mkdir -p "$OUT"
  : > "$OUT/summary.txt"
  local stages="${*:-cuda builds libs record bench_libs devnet}"
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  install
  export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  export TORCH_EXTENSIONS_DIR="$PWD/.torch_ext" TORCH_CUDA_ARCH_LIST
  TORCH_CUDA_ARCH_LIST=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  python3 -c "import torch, inference.select, overlay.host; print('torch', torch.__version__,
    torch.cuda.get_device_name(0))" >> "$OUT/install.log" 2>&1 || note "import check failed (install.log)"
  local pytest=(python3 -m pytest -q -p no:cacheprovider -o filterwarnings=ignore -o addopts=-ra -x)
  case " $stages " in *" cuda "*)
    stage tests_cuda 60 "${pytest[@]}" tests/gpu/test_engines.py -k "cuda_engine"
    stage bench_cuda 150 python3 bench/gpu.py --engines cuda --rounds 2 --no-devnet --json "$OUT/bench_cuda.json"
  esac
  local pids=()
  case " $stages " in *" builds "*)
    for lib in exllamav3 exllamav2; do
      (MAX_JOBS=8 timeout "$(left)" python3 -c "import $lib; print('$lib', $lib.__file__)" \
         > "$OUT/build_$lib.log" 2>&1; echo "build_$lib: rc $? at $(( $(date +%s) - T0 )) s" >> "$OUT/summary.txt") &
      pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
  esac
  case " $stages " in *" libs "*)
    stage tests_gpu 90 "${pytest[@]}" tests/gpu
  esac
  case " $stages " in *" record "*)
    stage record 60 python3 bench/gpu_record.py --out "$OUT/fixtures"
  esac
  case " $stages " in *" bench_libs "*)
    stage bench_libs 150 python3 bench/gpu.py --engines exllamav3,exllamav2 --rounds 2 --no-devnet \
      --json "$OUT/bench_libs.json"
  esac
  case " $stages " in *" devnet "*)
    stage bench_devnet 120 python3 bench/gpu.py --engines cuda --quick --no-service --batches 1 \
      --shapes llama-3.2-1b --json "$OUT/bench_devnet.json"
  esac
  note "done at $(( $(date +%s) - T0 )) s"
}

case "${1:-}" in
  prepare) prepare ;;
  device) shift; device "$@" ;;
  *) echo "usage: bench/gpu_run.sh prepare | device [stage...]"; exit 2 ;;
esac
