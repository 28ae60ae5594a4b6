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


.PHONY: all lib bin bench fuzz check-install check check-rust check-cli check-header check-c check-stress check-tsan check-examples check-python check-readme demo install clean

all: lib bin

# The CLI is linked statically (static-pie: glibc's libc.a, ASLR kept) when
# the toolchain can: a command run once per disk by a backup script starts in
# ~0.9 ms and ~1.5 MiB instead of ~1.5 ms and ~2.8 MiB (ld.so, libc.so and
# libgcc_s mapped in). It is built with the `cli` profile (Cargo.toml: small
# code, LTO), into target/cli; the flag reaches the binary's final link alone
# (cargo rustc) and the libraries stay as they are. build/bin/qbm is
# what `make install` and `make bench` use: `cargo test` rebuilds
# target/release/qbm its own way.
bin:
	mkdir -p $(OUT)/bin
	$(CARGO) rustc --profile cli --bin qbm -- -C target-feature=+crt-static || \
	  { echo "(no static libc: linking qbm dynamically)"; $(CARGO) build --profile cli --bin qbm; }
	cp target/cli/qbm $(OUT)/bin/.qbm.tmp
	mv -f $(OUT)/bin/.qbm.tmp $(OUT)/bin/qbm

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

check: check-rust check-cli check-header check-c check-stress check-examples check-python check-readme check-install
	@echo "make check: all passed"

check-rust:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test --release

# The CLI's tests once more against the binary `make install` ships (the
# `cli` profile, linked statically), not only cargo's release build.
check-cli: bin
	QBM_CLI=$(abspath $(OUT)/bin/qbm) $(CARGO) test --release --test cli

# The committed header must be what cbindgen generates from src/ffi.
check-header: lib
	git diff --exit-code -- include/qbm.h || \
	  { echo "include/qbm.h is stale: commit the regenerated header"; exit 1; }

$(OUT)/c-tests/%: c-tests/%.c c-tests/util.h include/qbm.h lib
	@mkdir -p $(dir $@)
	$(CC) $(CWARN) $(CFLAGS) -o $@ $< $(CTEST_LINK)

# The C tests run under valgrind when it is installed (`make check-c VALGRIND=`
# runs them bare): any invalid access or definite/indirect leak fails the test
# with rc 99. Children (QEMU's tools run by the tests) are not traced.
VALGRIND   ?= $(if $(shell command -v valgrind 2>/dev/null),valgrind)
VALGRIND_FLAGS := --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect \
	--show-leak-kinds=definite,indirect --trace-children=no -q \
	--suppressions=$(abspath c-tests/valgrind.supp)
VG_RUN     := $(if $(VALGRIND),$(VALGRIND) $(VALGRIND_FLAGS))

check-c: lib $(C_TESTS)
	@$(if $(VALGRIND),echo "(C tests under $(VALGRIND); VALGRIND= to run them bare)",echo "(C tests without valgrind)"); \
	fail=0; for t in $(C_TESTS); do \
	  echo "== $$t"; \
	  QBM_TEST_DIR=$$(mktemp -d) QBM_STRESS_SECONDS=$(STRESS_SECONDS_SHORT) $(VG_RUN) $$t; rc=$$?; \
	  if [ $$rc = 77 ]; then echo "   skipped"; \
	  elif [ $$rc = 99 ]; then echo "   FAILED: valgrind found errors (see above)"; fail=1; \
	  elif [ $$rc != 0 ]; then echo "   FAILED (exit $$rc)"; fail=1; fi; \
	done; exit $$fail

# c-tests/stress.c: marker threads against flush/add/remove/enable/disable/
# merge/clear. check-c runs it briefly (under valgrind: memory errors, leaks);
# check-stress runs it bare, where the threads really race, for
# STRESS_SECONDS of marking (plus a few seconds of checks).
STRESS_SECONDS       ?= 20
STRESS_SECONDS_SHORT ?= 3

check-stress: lib $(OUT)/c-tests/stress
	QBM_TEST_DIR=$$(mktemp -d) QBM_STRESS_SECONDS=$(STRESS_SECONDS) $(OUT)/c-tests/stress

# ThreadSanitizer over the library and the threaded C tests (not part of
# `make check`: the instrumented build takes a minute or two). Rust's TSan is
# a nightly flag; RUSTC_BOOTSTRAP=1 lets the stable toolchain take it. Its std
# is not rebuilt with TSan (that needs the rust-src component and -Zbuild-std),
# hence -Cunsafe-allow-abi-mismatch=sanitizer: libqbm, arc-swap and every
# generic std item it uses (Arc, atomics, Mutex) are instrumented, std's
# precompiled internals are not. The executables link the TSan runtime that
# ships with rustc (gcc's libtsan is too old for LLVM's instrumentation) and
# export it (-rdynamic) to the instrumented libqbm.so. Any report fails.
HOST_TRIPLE := $(shell rustc -vV 2>/dev/null | sed -n 's/^host: //p')
TSAN_RT     := $(firstword $(wildcard $(shell rustc --print sysroot 2>/dev/null)/lib/rustlib/$(HOST_TRIPLE)/lib/librustc-*_rt.tsan.a))
TSAN_SECONDS ?= 10
TSAN_TESTS  := stress threads intent

check-tsan:
	@test -n "$(TSAN_RT)" || { echo "check-tsan: no TSan runtime (librustc-*_rt.tsan.a) in the Rust toolchain"; exit 1; }
	RUSTC_BOOTSTRAP=1 RUSTFLAGS="-Zsanitizer=thread -Cunsafe-allow-abi-mismatch=sanitizer" \
	  $(CARGO) build --release --lib --target $(HOST_TRIPLE) --target-dir target/tsan
	mkdir -p $(OUT)/tsan
	cp target/tsan/$(HOST_TRIPLE)/release/libqbm.so $(OUT)/tsan/libqbm.so.0
	ln -sf libqbm.so.0 $(OUT)/tsan/libqbm.so
	set -e; for t in $(TSAN_TESTS); do \
	  $(CC) $(CWARN) -O1 -g -fsanitize=thread -I include -c -o $(OUT)/tsan/$$t.o c-tests/$$t.c; \
	  $(CC) -o $(OUT)/tsan/$$t $(OUT)/tsan/$$t.o -rdynamic -Wl,--whole-archive $(TSAN_RT) -Wl,--no-whole-archive \
	    -L $(OUT)/tsan -Wl,-rpath,$(abspath $(OUT)/tsan) -lqbm -lpthread -ldl -lm; \
	  echo "== $$t under ThreadSanitizer"; \
	  TSAN_OPTIONS="halt_on_error=1 exitcode=66 $(TSAN_OPTIONS)" QBM_TEST_DIR=$$(mktemp -d) \
	    QBM_STRESS_SECONDS=$(TSAN_SECONDS) $(OUT)/tsan/$$t; \
	done

# The backup recipe of the README, in C (under valgrind when installed) and in
# Python; each example checks its own result and exits non-zero if it is wrong.
check-examples: lib
	@mkdir -p $(OUT)/examples
	$(CC) $(CWARN) $(CFLAGS) -o $(OUT)/examples/backup examples/backup.c $(CTEST_LINK)
	$(VG_RUN) $(OUT)/examples/backup $(OUT)/examples
	QBM_LIBRARY=$(abspath $(LIBDIR_OUT))/$(SONAME) PYTHONPATH=$(abspath python) \
	  python3 examples/backup.py $(OUT)/examples

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
	install -m 0755 $(OUT)/bin/qbm $(DESTDIR)$(BINDIR)/qbm
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

# make bench: issue 5's figures against QEMU's tools and bare-C limits,
# measured in the same run; prints one table, writes bench-results.json.
BENCH_BINS := $(OUT)/bench/mark $(OUT)/bench/lib $(OUT)/bench/intent $(OUT)/bench/spawn $(OUT)/bench/floor

$(OUT)/bench/%: benches/%.c include/qbm.h lib
	@mkdir -p $(dir $@)
	$(CC) $(CWARN) -O2 -g -o $@ $< $(CTEST_LINK)

# spawn times the whole-process rows (fork+exec, wait4's ru_maxrss); static so
# that the pre-exec image its children start from is small. floor is the
# process-creation floor those rows are read against: int main(){return 0;}.
# Both fall back to dynamic linking when there is no static libc.
$(OUT)/bench/spawn: benches/spawn.c
	@mkdir -p $(dir $@)
	$(CC) $(CWARN) -O2 -static -o $@ $< 2>/dev/null || $(CC) $(CWARN) -O2 -o $@ $<

$(OUT)/bench/floor:
	@mkdir -p $(dir $@)
	printf 'int main(void) { return 0; }\n' > $@.c
	$(CC) -O2 -static -o $@ $@.c 2>/dev/null || $(CC) -O2 -o $@ $@.c

bench: lib bin $(BENCH_BINS)
	python3 benches/run.py $(OUT)

# Fuzzing with cargo-fuzz (fuzz/): each target runs FUZZ_SECONDS seconds on
# the corpus fuzz/make-seeds.sh builds from QEMU-made images. cargo-fuzz
# passes nightly -Z flags; only the stable toolchain is installed, hence
# RUSTC_BOOTSTRAP=1. Not part of `make check`.
FUZZ_SECONDS ?= 60

fuzz:
	@$(CARGO) fuzz --version >/dev/null 2>&1 || \
	  { echo "make fuzz needs cargo-fuzz: cargo install cargo-fuzz"; exit 1; }
	@[ -d fuzz/corpus/open_image ] || bash fuzz/make-seeds.sh
	@for t in open_image header extension bitmap_dir bitmap_table refcount; do \
	  echo "== fuzz $$t for $(FUZZ_SECONDS) s"; \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -O $$t fuzz/corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -timeout=30 || exit 1; \
	done
