#!/usr/bin/env bash
# Debian/Ubuntu packages pose_node needs outside pip: a compiler and cmake (to build the ROS interface
# packages PyPI lacks) and libLLVM 19 (Mitsuba's CPU backend; the libLLVM 15 that some images carry
# aborts drjit). Installs them with apt-get when run as root, otherwise says what to install.
# Idempotent: prints nothing but one line when everything is present.
set -u

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
python3 -c "import venv, ensurepip" >/dev/null 2>&1 || missing+=(python3-venv)
python3 -c "import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
  || missing+=(python3-dev)
ls /usr/lib/*/libLLVM.so.19* /usr/lib/*/libLLVM-19.so* >/dev/null 2>&1 || missing+=(libllvm19)

if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages: present"
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system packages missing: ${missing[*]}"
  echo "  install them with: sudo apt-get install -y ${missing[*]}"
  echo "  (without libllvm19 the Mitsuba renderer is unavailable and the pure-PyTorch one is used)"
  exit 0
fi
echo "system packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${missing[@]}" >/tmp/pose_node_apt.log 2>&1 \
  || { apt-get update -q >>/tmp/pose_node_apt.log 2>&1 && apt-get install -y -q "${missing[@]}" >>/tmp/pose_node_apt.log 2>&1; } \
  || { echo "apt-get failed (log: /tmp/pose_node_apt.log):"; tail -5 /tmp/pose_node_apt.log; exit 1; }
