.PHONY: demo test up down setup
setup:
	bash scripts/bootstrap.sh
demo:
	bash scripts/demo.sh $(ARGS)
test:
	bash scripts/test.sh
up: setup
	.venv/bin/loquetier up
down:
	.venv/bin/loquetier down
