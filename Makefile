# Tessera build, test and provisioning targets.
# `make test` and `make demo` need nothing but Go, npm (once, for `make ort`) and this file.

GO      ?= go
BIN     ?= bin/tessera
ORT_LIB := .ort/libonnxruntime.so.1

.PHONY: all build ort test test-short bench demo models fmt vet clean

all: build

# ort fetches ONNX Runtime's shared library (pinned version and checksum) into .ort/.
ort: $(ORT_LIB)

$(ORT_LIB): tools/fetch-ort.sh
	./tools/fetch-ort.sh
	@touch $(ORT_LIB)

build: ort
	$(GO) build -o $(BIN) .

# test runs every test against the real ONNX Runtime in .ort/.
test: ort
	@unformatted="$$("$$($(GO) env GOROOT)/bin/gofmt" -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))"; \
	if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted"; exit 1; fi
	$(GO) vet ./...
	$(GO) test -count=1 -timeout 20m ./...

test-short: ort
	$(GO) test -short -count=1 ./...

bench: ort
	$(GO) test -run '^$$' -bench . -benchtime 2s ./...

# demo runs the main job on the embedded default models.
demo: build
	./$(BIN) run examples/demo.yaml

# models regenerates the demo models and test fixtures with Debian's python3-torch.
# CI does not run it: the exported .onnx files are committed.
models:
	./tools/make-models.sh

fmt:
	gofmt -w $$(git ls-files '*.go')

clean:
	rm -rf bin
