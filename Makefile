# libqbm — build, test, install. `make demo` and `make check` are the two
# commands a newcomer needs (see README.md).

PREFIX     ?= /usr/local
LIBDIR     ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
BINDIR     ?= $(PREFIX)/bin
DESTDIR    ?=
CARGO      ?= cargo
CC         ?= cc

VERSION    := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
MAJOR      := $(word 1,$(subst ., ,$(VERSION)))
RELEASE    := target/release
OUT        := build
LIBDIR_OUT := $(OUT)/lib
SONAME     := libqbm.so.$(MAJOR)
CFLAGS     ?= -O2 -g
CWARN      := -std=c11 -Wall -Wextra -Wpedantic -Werror
CTEST_LINK := -I include -L $(LIBDIR_OUT) -Wl,-rpath,$(abspath $(LIBDIR_OUT)) -lqbm -lpthread

C_TESTS    := $(patsubst c-tests/%.c,$(OUT)/c-tests/%,$(filter-out c-tests/demo.c,$(wildcard c-tests/*.c)))


.PHONY: all lib bin check-install check check-rust check-header check-c check-python check-readme demo install clean

all: lib bin

bin:
	$(CARGO) build --release --bin qbm

# cargo builds both libraries; the versioned names and links match what
# cargo-c and distributions install: libqbm.so -> libqbm.so.0 -> libqbm.so.X.Y.Z
lib:
	$(CARGO) build --release --lib
	mkdir -p $(LIBDIR_OUT)
	# Copy then rename: a test running against the old library keeps its mapping.
	cp $(RELEASE)/libqbm.so $(LIBDIR_OUT)/.libqbm.so.tmp
	mv -f $(LIBDIR_OUT)/.libqbm.so.tmp $(LIBDIR_OUT)/libqbm.so.$(VERSION)
	ln -sf libqbm.so.$(VERSION) $(LIBDIR_OUT)/$(SONAME)
	ln -sf $(SONAME) $(LIBDIR_OUT)/libqbm.so
	cp $(RELEASE)/libqbm.a $(LIBDIR_OUT)/libqbm.a

check: check-rust check-header check-c check-python check-readme check-install
	@echo "make check: all passed"

check-rust:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test --release

# The committed header must be what cbindgen generates from src/ffi.
check-header: lib
	git diff --exit-code -- include/qbm.h || \
	  { echo "include/qbm.h is stale: commit the regenerated header"; exit 1; }

$(OUT)/c-tests/%: c-tests/%.c c-tests/util.h include/qbm.h lib
	@mkdir -p $(dir $@)
	$(CC) $(CWARN) $(CFLAGS) -o $@ $< $(CTEST_LINK)

check-c: lib $(C_TESTS)
	@fail=0; for t in $(C_TESTS); do \
	  echo "== $$t"; \
	  QBM_TEST_DIR=$$(mktemp -d) $$t; rc=$$?; \
	  if [ $$rc = 77 ]; then echo "   skipped"; elif [ $$rc != 0 ]; then fail=1; fi; \
	done; exit $$fail

check-python: lib
	QBM_LIBRARY=$(abspath $(LIBDIR_OUT))/$(SONAME) python3 -m pytest -q python/tests

# The C example in the README must compile and run; its shell session must
# print what it shows.
check-readme: lib
	@mkdir -p $(OUT)/readme
	awk '/^```c$$/{f=1;next} /^```$$/{f=0} f' README.md > $(OUT)/readme/example.c
	$(CC) $(CWARN) $(CFLAGS) -o $(OUT)/readme/example $(OUT)/readme/example.c $(CTEST_LINK)
	cd $(OUT)/readme && rm -f example.qcow2 && ./example
	$(CARGO) build --release --bin qbm
	bash tests/readme_session.sh

demo: lib
	@mkdir -p $(OUT)/demo
	$(CC) $(CWARN) $(CFLAGS) -o $(OUT)/demo/demo c-tests/demo.c $(CTEST_LINK)
	cd $(OUT)/demo && rm -f demo.qcow2 && ./demo demo.qcow2
	@if command -v qemu-img >/dev/null; then \
	  echo; echo "== what QEMU sees: qemu-img info $(OUT)/demo/demo.qcow2"; \
	  qemu-img info $(OUT)/demo/demo.qcow2; \
	  echo "== qemu-img check"; qemu-img check $(OUT)/demo/demo.qcow2; \
	else echo "(qemu-img not installed: skipping QEMU's view)"; fi
	@if command -v qemu-nbd >/dev/null && command -v nbdinfo >/dev/null; then \
	  echo; echo "== bitmap backup-1 as QEMU exports it (qemu-nbd -B + nbdinfo --map)"; \
	  sock=$$(mktemp -u /tmp/qbm-demo.XXXXXX); \
	  qemu-nbd -r -f qcow2 -B backup-1 --socket=$$sock $(OUT)/demo/demo.qcow2 & pid=$$!; \
	  for i in $$(seq 50); do [ -S $$sock ] && break; sleep 0.1; done; \
	  nbdinfo --map=qemu:dirty-bitmap:backup-1 "nbd+unix:///?socket=$$sock"; \
	  kill $$pid; wait $$pid 2>/dev/null; rm -f $$sock; \
	fi

install: lib bin
	install -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(LIBDIR)/pkgconfig $(DESTDIR)$(BINDIR)
	install -m 0755 $(RELEASE)/qbm $(DESTDIR)$(BINDIR)/qbm
	install -m 0755 $(LIBDIR_OUT)/libqbm.so.$(VERSION) $(DESTDIR)$(LIBDIR)/
	ln -sf libqbm.so.$(VERSION) $(DESTDIR)$(LIBDIR)/$(SONAME)
	ln -sf $(SONAME) $(DESTDIR)$(LIBDIR)/libqbm.so
	install -m 0644 $(LIBDIR_OUT)/libqbm.a $(DESTDIR)$(LIBDIR)/
	install -m 0644 include/qbm.h $(DESTDIR)$(INCLUDEDIR)/
	printf '%s\n' 'prefix=$(PREFIX)' 'libdir=$(LIBDIR)' 'includedir=$(INCLUDEDIR)' '' \
	  'Name: qbm' 'Description: QEMU-compatible persistent dirty bitmaps for qcow2 images' \
	  'Version: $(VERSION)' 'Libs: -L$${libdir} -lqbm' 'Libs.private: -lpthread -ldl -lm' \
	  'Cflags: -I$${includedir}' > $(DESTDIR)$(LIBDIR)/pkgconfig/qbm.pc

# make install into temporary prefixes, then build C and Python against it.
check-install: lib
	bash tests/install.sh

clean:
	$(CARGO) clean
	rm -rf $(OUT)

# Fuzzing with cargo-fuzz (fuzz/): each target runs FUZZ_SECONDS seconds on
# the corpus fuzz/make-seeds.sh builds from QEMU-made images. cargo-fuzz
# passes nightly -Z flags; only the stable toolchain is installed, hence
# RUSTC_BOOTSTRAP=1. Not part of `make check`.
FUZZ_SECONDS ?= 60

.PHONY: fuzz
fuzz:
	@$(CARGO) fuzz --version >/dev/null 2>&1 || \
	  { echo "make fuzz needs cargo-fuzz: cargo install cargo-fuzz"; exit 1; }
	@[ -d fuzz/corpus/open_image ] || bash fuzz/make-seeds.sh
	@for t in open_image header extension bitmap_dir bitmap_table refcount; do \
	  echo "== fuzz $$t for $(FUZZ_SECONDS) s"; \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -O $$t fuzz/corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -timeout=30 || exit 1; \
	done
