# adaface-serving front door: `make serve`, `make test`, `make bench`, `make soak`, `make proto`,
# `make lint`, `make test-containers`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# FORMAT=arcface_torch reads InsightFace backbone.pth files (ARCH=r18 r34 r50 r100, RGB input).
FORMAT ?= adaface
ARCH ?= $(if $(filter arcface_torch,$(FORMAT)),r50,ir_50)
MODEL ?= $(if $(filter arcface_torch,$(FORMAT)),arcface,adaface)_$(subst _,,$(ARCH))
REPO ?= model_repository
CKPT ?=
PORT ?= 50051
# HTTP/JSON API and web console (http://localhost:8080/); the server's default leaves it off.
HTTP_PORT ?= 8080
# MTCNN face-detector weights (ALIGNMENT_DETECT), fetched and sha256-checked by `make venv`.
MTCNN_WEIGHTS ?= .cache/mtcnn
# On a 2-core CPU, forward passes of 8 images beat 32 (make bench); Triton keeps config's 32.
SERVE_ARGS ?= --max-batch-size 8

.PHONY: venv browser export serve test test-fast bench soak proto proto-check lint format clean \
	postgres-server test-containers gpu-wheels

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml client/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Two distributions: adaface-client (client/: stubs, library, CLIs; no torch) and the server.
	# An adaface-serving from before the split owns the client's scripts: removed first, or its
	# uninstall would delete them again.
	$(PIP) uninstall -q -y adaface-serving
	$(PIP) install -q -c constraints.txt -e './client[ray]' -e '.[dev,openvino,bench]'
	# Tests and benchmarks run its bundled tritonserver binary; its own pins would clash.
	$(PIP) install -q --no-deps -c constraints.txt nvidia-pytriton
	$(PY) -m adaface_server.preprocess.mtcnn_weights --dest $(MTCNN_WEIGHTS)
	touch $@

# Exports $(CKPT) (or, without CKPT, a randomly initialised $(ARCH)) into $(REPO)/$(MODEL),
# and with OPENVINO=1 (the default) its OpenVINO IR as $(MODEL)_openvino, which the server's
# --runtime auto serves on CPUs (the fastest CPU runtime make bench measured).
OPENVINO ?= 1
export: venv
	$(PY) -m adaface_server.models.export --format $(FORMAT) --arch $(ARCH) --repository $(REPO) \
		--name $(MODEL) $(if $(CKPT),--checkpoint $(CKPT),) $(if $(filter 1,$(OPENVINO)),--openvino,)

# Exports only when there is no model yet or a checkpoint was given.
serve: venv
	@if [ -n "$(CKPT)" ] || [ ! -f "$(REPO)/$(MODEL)/1/model.pt" ]; then $(MAKE) --no-print-directory export; fi
	$(PY) -m adaface_server --model-repository $(REPO) --model $(MODEL) --port $(PORT) \
		--http-port $(HTTP_PORT) --mtcnn-weights $(MTCNN_WEIGHTS) $(SERVE_ARGS)

# Debian's chromium for the web-console browser test; installs (as root) only when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

test: venv browser postgres-server
	$(PY) -m pytest -q

# The gallery tests start throw-away PostgreSQL clusters: install the server binaries when
# missing (root, Debian/Ubuntu). Idempotent: does nothing when initdb is already there.
postgres-server:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		[ -x "$$(pg_config --bindir 2>/dev/null)/initdb" ]; then :; else \
		echo "installing the PostgreSQL server (apt-get)"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; fi

# Builds and runs the images with rootful podman, offline (~12 min cold, ~4 warm): the server
# image alone, then the export -> triton -> server stack with podman-compose. Installs the
# Debian packages it needs when missing; the base rootfs, wheels and images stay cached in
# .cache/containers/ (delete it to start from nothing).
CONTAINER_PACKAGES ?= podman buildah debootstrap fuse-overlayfs slirp4netns uidmap runc \
	netavark aardvark-dns iptables

test-containers: venv
	@dpkg -s $(CONTAINER_PACKAGES) >/dev/null 2>&1 || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(CONTAINER_PACKAGES); }
	$(PIP) install -q -c constraints.txt podman-compose
	ADAFACE_CONTAINER_TESTS=1 $(PY) -m pytest -q tests/containers

bench: venv
	$(PY) bench/run.py

# Wheels of our runtime dependencies that the lent GPU machine's image (Python 3.12) lacks or
# has in other versions, for bench/gpu_device_run.sh there (carry .whl and .cache/mtcnn).
GPU_WHEELS = grpcio grpcio-health-checking grpcio-reflection protobuf tritonclient \
	python-rapidjson simplejpeg psycopg psycopg-binary psycopg-pool

gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	for pkg in $(GPU_WHEELS); do \
		version=$$(grep -i "^$$pkg==" constraints.txt | cut -d= -f3); \
		python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
			--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
			--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
			-d .whl "$$pkg$${version:+==$$version}" || exit 1; \
	done
	du -sh .whl

# Load + fault soak (~3-5 min) printing a summary table; the disk-full phase mounts a tmpfs
# (root only, otherwise reported as skipped). e.g. make soak SOAK_ARGS="--duration 60 --out soak.md"
SOAK_ARGS ?=

soak: venv
	$(PY) bench/soak.py $(SOAK_ARGS)

proto: venv
	$(PY) -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos protos/adaface/v1/*.proto

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
