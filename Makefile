# The two commands a newcomer types: `make run` and `make test`. Both set up .venv first.
PY      := .venv/bin/python
PIP     := .venv/bin/pip -q --disable-pip-version-check
STAMP   := .venv/.embshard-installed
REQS    := $(wildcard requirements/*.txt) pyproject.toml
# Ray 2.60 enables token auth by default (and stores a token in ~/.ray); `embshard submit` and the
# cluster it submits to must agree. The local in-process cluster of `embshard train` ignores this:
# it always runs with a private per-run token (cluster/launch.py:_private_token_auth).
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
OUT     ?= outputs/default

.PHONY: setup run lint test test-fast bench clean schemas

setup: $(STAMP)

$(STAMP): $(REQS)
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install "setuptools>=68" wheel
	$(PIP) install -r requirements/torch.txt
	$(PIP) install --no-deps -r requirements/nodeps.txt
	$(PIP) install -r requirements/base.txt -r requirements/test.txt
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The demo job starts fresh each time: a run folder with checkpoints would otherwise be resumed.
run: setup
	rm -rf $(OUT)/run
	.venv/bin/embshard data synth --out $(OUT)/data --rows 200000 --seed 0 --overwrite
	.venv/bin/embshard train configs/default.yaml --workers 2 \
	    --set data.path=$(OUT)/data --set output_dir=$(OUT)/run

# mypy cannot map `embshard.planner.x` to planner/x.py (package-dir), so it checks an installed
# copy; its paths are mapped back to the repository's (embshard/<layer>/ -> <layer>/: every
# subpackage of embshard is a layer folder) so that editors can jump to them. build/lib goes too:
# setuptools packs whatever it holds, leftovers of deleted modules included.
TYPECHECK := build/typecheck

lint: setup
	$(PY) -m ruff check .
	rm -rf build/lib $(TYPECHECK)
	$(PIP) install --no-deps --no-build-isolation --no-compile --target $(TYPECHECK) .
	cd $(TYPECHECK) && $(CURDIR)/$(PY) -m mypy --config-file $(CURDIR)/pyproject.toml \
	    --cache-dir $(CURDIR)/build/mypy-cache -p embshard > ../mypy.out; \
	    rc=$$?; sed -E 's#^embshard/([a-z_]+)/#\1/#' ../mypy.out; exit $$rc

test: lint
	bash deploy/install-prometheus.sh || true
	# The slowest tests are listed so the suite's ~20 min budget on 2 cores can be watched in CI's log.
	# Two pytest processes: tests that start Ray run one at a time in one of them (tests/conftest.py).
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

test-fast: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow"

# Generated from the config dataclasses: the reference, and the Helm chart's schema of `config`
# (tests fail while either is stale).
schemas: setup
	.venv/bin/embshard config --reference > docs/config.md
	$(PY) -c "from embshard.config_reference import update_chart_schema; update_chart_schema()"

clean:
	rm -rf .venv outputs .pytest_cache
