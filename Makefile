# The two commands a fresh machine needs (see README.md):
#   make demo   - install, then train and evaluate the embedded demo end to end
#   make test   - install, bring up a local Slurm and ssh to localhost for pdsh (as root, if possible),
#                 run the test suite
# And on a lent GPU machine (no network; no install: it runs from the checkout):
#   make gpu-check - the one-shot GPU matrix (launch/gpu_check.py), wheels from $(WHEELS)
#                    (made beforehand where pip works: bash launch/gpu_wheels.sh), JSON under benchmarks/
PY ?= python3
TORCH ?= torch==2.13.0
WHEELS ?= .whl

.PHONY: install install-test demo test slurm ssh browser gpu-check

install:
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[mpi]" mpich

# The tests also drive vlm-serve/vlm-ui (FastAPI, Gradio, the openai client, Selenium) and lmms-eval.
# lmms-eval ([eval]) declares torchvision and timm. PyPI's Linux torchvision wheels are CUDA builds
# (they link libc10_cuda): next to a CPU torch they fail to import, and transformers, which imports
# torchvision when it is installed, then cannot load Qwen3 at all. On a CPU torch they are removed again
# (neither lmms-eval's harness nor the vlm_dist model imports them); a CUDA torch keeps them.
install-test: install
	$(PY) -m pip install -q -e ".[mpi,serve,eval,test]" mpich "$(TORCH)"
	@if $(PY) -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then \
		$(PY) -m pip uninstall -y -q torchvision timm 2>/dev/null || true; fi

demo: install
	$(PY) launch/demo.py --out demo_out

slurm:
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then bash .ci/slurm_up.sh; \
	else echo "not root or no apt-get: Slurm tests will be skipped"; fi

ssh:
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then bash .ci/ssh_up.sh; \
	else echo "not root or no apt-get: the pdsh launcher tests will be skipped"; fi

browser:
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then bash .ci/browser_up.sh; \
	else echo "not root or no apt-get: the browser (UI) tests will be skipped"; fi

test: install-test slurm ssh browser
	$(PY) -m pytest tests -q -ra --durations=15

gpu-check:
	PYTHONPATH=$(CURDIR) $(PY) launch/gpu_check.py --wheels $(WHEELS) --out benchmarks
