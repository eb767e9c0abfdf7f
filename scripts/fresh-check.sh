#!/usr/bin/env bash
# `make fresh-check`: the README's two commands on a bare Debian 12, as a new user would run them. Not in CI: it
# needs root (debootstrap, chroot, mounts) and several GB under $FRESH_DIR.
#
# 1. debootstrap a minimal bookworm root, with the apt sources of a fresh install (main, updates, security);
# 2. install the README's stated prerequisites in it, and nothing else: make and python3 (and sudo, for a user);
# 3. clone the repository's HEAD into it (committed work only, like any clone);
# 4. in the root, in namespaces of their own (mounts and processes end with the check): `make demo` with
#    --no-serve, then `make test`, each step timed, with the test summary at the end.
#
# FRESH_USER=NAME runs the two commands as that user, with sudo for the Debian packages (default: as root).
# torch: FRESH_TORCH=local (the default) shows the root this machine's CPU torch wheel, if pip's find-links has
# one, as a machine that carries it would; FRESH_TORCH=pypi hides it, so the Makefile takes the next source it
# can reach (PyTorch's CPU index, else PyPI's CUDA build: 2.7 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
[ "$(id -u)" -eq 0 ] || { echo "fresh-check needs root (debootstrap, chroot, mounts)" >&2; exit 2; }
work=${FRESH_DIR:-/var/tmp/health-mlops-fresh}
torch=${FRESH_TORCH:-local}
mirror=${FRESH_MIRROR:-http://deb.debian.org/debian}
user=${FRESH_USER:-root}
home_of() { if [ "$1" = root ]; then echo /root; else echo "/home/$1"; fi; }
home=$(home_of "$user")
root=$work/root
logs=$work/logs

step() {  # step NAME COMMAND...: runs COMMAND with its output in $logs/NAME.log, and prints how long it took
  local name=$1 started=$SECONDS
  shift
  printf '%-44s ' "$name" >&2
  if "$@" >"$logs/$name.log" 2>&1; then
    printf '%4d s\n' $((SECONDS - started)) >&2
  else
    printf '%4d s  FAILED; the end of %s:\n' $((SECONDS - started)) "$logs/$name.log" >&2
    tail -n 40 "$logs/$name.log" >&2
    echo "the root is kept in $root for a look" >&2
    exit 1
  fi
}

# `in_root USER COMMAND...` runs the command line as USER inside the root: its own mount and PID namespaces, so
# every mount and process is gone when it returns; an environment of a bare machine (nothing of this shell's).
in_root() {
  local as=$1 wheels=""
  shift
  local env=(HOME="$(home_of "$as")" LANG=C.UTF-8 TERM=dumb PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)
  # pip in the root trusts what this host trusts: where PyPI is reached through a proxy that re-signs TLS, only
  # the host's bundle holds that proxy's CA. On an open network this changes nothing.
  if [ -f "$root/etc/ssl/host-ca.crt" ]; then env+=(PIP_CERT=/etc/ssl/host-ca.crt); fi
  if [ "$torch" = local ] && [ -n "$torch_wheels" ]; then
    wheels=$torch_wheels
    env+=(PIP_FIND_LINKS=/opt/wheels)
  fi
  unshare --mount --pid --fork --kill-child --propagation private -- bash -euc '
    root=$1 wheels=$2 as=$3; shift 3
    mount -t proc proc "$root/proc"
    mount --rbind /sys "$root/sys"
    mount --rbind /dev "$root/dev"
    mount -t tmpfs tmpfs "$root/tmp"
    if [ -n "$wheels" ]; then mkdir -p "$root/opt/wheels"; mount --bind -o ro "$wheels" "$root/opt/wheels"; fi
    exec chroot --userspec="$as:$as" "$root" /usr/bin/env -i "$@"' in_root "$root" "$wheels" "$as" "${env[@]}" \
    bash -c "$*"
}

# The directory holding the CPU torch wheel pip would find on this machine, if any.
torch_wheels=""
for dir in ${PIP_FIND_LINKS:-} $(pip config get global.find-links 2>/dev/null || true); do
  if compgen -G "$dir/torch-*+cpu-cp311-*.whl" >/dev/null; then torch_wheels=$(realpath "$dir"); break; fi
done

rm -rf --one-file-system "$work"
mkdir -p "$logs"
case $torch in
  local) source=${torch_wheels:+"this machine's wheel from $torch_wheels"} ;;
  *) source="no local wheel" ;;
esac
echo "fresh-check: $(git -C "$repo" rev-parse --short HEAD) on a bare Debian 12 in $root as $user" \
  "(torch: ${source:-no local wheel on this machine})" >&2
command -v debootstrap >/dev/null || step host-debootstrap bash -c \
  'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap'
step debootstrap debootstrap --variant=minbase bookworm "$root" "$mirror"
cp /etc/resolv.conf /etc/hosts "$root/etc/"  # name resolution, and this host's name for sudo
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  mkdir -p "$root/etc/ssl" && cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/host-ca.crt"
fi
cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
prerequisites="make python3"
[ "$user" = root ] || prerequisites+=" sudo"
step prerequisites in_root root \
  "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $prerequisites"
if [ "$user" != root ]; then
  in_root root "useradd --create-home --shell /bin/bash $user \
    && echo '$user ALL=(ALL) NOPASSWD: ALL' >/etc/sudoers.d/$user && chmod 0440 /etc/sudoers.d/$user"
fi
echo "  $(in_root root 'python3 --version') from Debian;" \
  "ensurepip present: $(in_root root 'python3 -c "import ensurepip" 2>/dev/null && echo yes || echo no')" >&2
git clone --quiet --no-hardlinks "$repo" "$root$home/health-mlops"
in_root root "chown -R $user: $home/health-mlops"
step make-demo in_root "$user" "cd $home/health-mlops && make demo DEMO_ARGS=--no-serve"
step make-test in_root "$user" "cd $home/health-mlops && PYTEST_ADDOPTS=--junitxml=$home/junit.xml make test"

echo "--- make demo: the comparison table" >&2
sed -n '/federated vs pooled/,$p' "$logs/make-demo.log" >&2
echo "--- what the two commands installed, and the tests" >&2
grep -E '^(installing Debian packages|torch )' "$logs/make-demo.log" "$logs/make-test.log" | sed 's/^.*\.log://' >&2
echo "  kubectl in .venv: $(in_root "$user" "$home/health-mlops/.venv/bin/kubectl version --client" | head -1)" >&2
echo "  checkov in .venv-checkov: $(in_root "$user" "$home/health-mlops/.venv-checkov/bin/checkov --version")" >&2
python3 - "$root$home/junit.xml" >&2 <<'EOF'
import collections, sys, xml.etree.ElementTree as ET
counts = collections.defaultdict(collections.Counter)  # tests/unit, tests/k8s, ...: outcome -> tests
for case in ET.parse(sys.argv[1]).iter("testcase"):
    outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
    counts["/".join(case.get("classname").split(".")[:2])][outcome] += 1
for folder, outcomes in sorted(counts.items()):
    print(f"  {folder}: " + ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items())))
EOF
echo "  $(tail -n 1 "$logs/make-test.log")" >&2
rm -rf --one-file-system "$root"
echo "fresh-check passed; logs in $logs" >&2
