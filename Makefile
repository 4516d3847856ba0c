# hsmsim's front door: every developer command is a target here.
#   make run   set everything up and start the default cluster (hsmsim up)
#   make test  set everything up and run the whole test suite
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.hsmsim-installed
DEBS   := softhsm2 opensc libengine-pkcs11-openssl nginx-light libssl-dev libffi-dev gcc make patch
# tests/clients: the JDK (SunPKCS11), Go with Debian's crypto11 (GOPATH mode) and g++ for
# pkcs11js's node-gyp build; node and npm come with the machine, pkcs11js from npm at test time
DEBS   += default-jdk-headless golang-go golang-github-thalesignite-crypto11-dev g++
# tests/clients: OpenSSH, GnuTLS's p11tool/certtool, p11-kit and its proxy module
DEBS   += openssh-client gnutls-bin p11-kit p11-kit-modules
NATIVE_SRC := $(shell find native softhsm-config -type f 2>/dev/null) setup.py pyproject.toml
PYTEST_ARGS ?=

.PHONY: help deps venv build test soak run bench bench-core bench-node bench-cluster bench-pkcs11 bench-kms bench-tls typecheck kms-shapes cloudhsm-shapes aws-models clean

help:
	@echo "make run    - set up and start the default 3-HSM cluster (hsmsim up)"
	@echo "make test   - set up and run the test suite"
	@echo "make soak   - long soak and fuzz runs (marker: soak)"
	@echo "make bench  - every benchmark, one markdown table of ratios"
	@echo "make bench-{core,node,cluster,pkcs11,kms,tls}"
	@echo "make typecheck - mypy --strict"
	@echo "make kms-shapes - regenerate hsmsim/kms/api_model.json and inputs.py from botocore"
	@echo "make cloudhsm-shapes - the same for hsmsim/cloudhsm/ (aws-models: both)"

# Debian packages: apt-get update once, only when something is missing.
deps:
	@missing=""; for p in $(DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel cffi

# Editable install with test extras; rebuilt whenever C, build or config sources change.
$(STAMP): $(PY) $(NATIVE_SRC)
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	@touch $(STAMP)

venv: deps $(STAMP)
build: venv

test: venv
	$(BIN)/pytest -m "not soak" $(PYTEST_ARGS)

soak: venv
	$(BIN)/pytest -m soak $(PYTEST_ARGS)

run: venv
	$(BIN)/hsmsim up

typecheck: venv
	$(BIN)/mypy

# Regenerate the KMS model (package data) and its typed inputs from the installed botocore;
# tests/kms/test_shapes_fresh.py fails until this is run after a botocore upgrade.
kms-shapes: venv
	$(PY) tools/gen_aws_model.py kms
# The same for the CloudHSMv2 control plane (tests/cloudhsm/test_shapes_fresh.py).
cloudhsm-shapes: venv
	$(PY) tools/gen_aws_model.py cloudhsmv2
aws-models: kms-shapes cloudhsm-shapes

bench-core: venv
	$(PY) -m hsmsim.bench core
bench-node: venv
	$(PY) -m hsmsim.bench node
bench-cluster: venv
	$(PY) -m hsmsim.bench cluster
bench-pkcs11: venv
	$(PY) -m hsmsim.bench pkcs11
bench-kms: venv
	$(PY) -m hsmsim.bench kms
bench-tls: venv
	$(BIN)/hsmsim tls bench
bench: venv
	$(PY) -m hsmsim.bench all

clean:
	rm -rf build dist *.egg-info hsmsim/_lib hsmsim/core/_native*.so .pytest_cache
