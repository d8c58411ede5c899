# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
OUT ?= out

.PHONY: install demo test wheel-check clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch==2.13.0 is a CPU build on local disk; a bare `torch` would pull a multi-GB CUDA build.
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/janus-decode make-tiny $(OUT)/tiny-model --seed 0
	$(VENV)/bin/janus-decode generate "a red cube on a blue sphere" "a lighthouse at dusk" \
		--model $(OUT)/tiny-model -n 4 --cfg 5 \
		--decoder 'top_k(top_k=200) > temperature(temperature=0.9)' --out $(OUT)/demo --explain
	@echo "images written under $(OUT)/demo (random weights: expect noise)"

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile
	$(MAKE) wheel-check

# A built wheel must give the same imports as the editable install.
wheel-check: $(STAMP)
	rm -rf build/wheel-check && mkdir -p build/wheel-check
	$(PY) -m build --wheel --no-isolation --outdir build/wheel-check . >/dev/null
	$(PYTHON) -m venv build/wheel-check/venv
	# See the dependencies of $(VENV) without its editable finder (a plain path in a .pth is not itself scanned for .pth files).
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$$(build/wheel-check/venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/deps.pth"
	build/wheel-check/venv/bin/python -m pip --disable-pip-version-check -q install --no-deps build/wheel-check/*.whl
	cd build/wheel-check && venv/bin/python -c "import janus_decoding, janus_decoding.core, janus_decoding.plugins, janus_decoding.strategies, janus_decoding.models, janus_decoding.testing; import importlib.util as u; assert all(u.find_spec(m) is None for m in ('core','plugins','strategies','models')), 'stray top-level module'; print('wheel imports ok:', janus_decoding.__file__)"

clean:
	rm -rf $(VENV) build dist *.egg-info $(OUT)
