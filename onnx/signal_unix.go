//go:build linux || darwin

package onnx

/*
#include <signal.h>
#include <string.h>

#define TESSERA_NSIG 65
static struct sigaction tessera_saved[TESSERA_NSIG];
static int tessera_valid[TESSERA_NSIG];

static void tessera_save_handlers(void) {
	for (int i = 1; i < TESSERA_NSIG; i++) {
		tessera_valid[i] = sigaction(i, NULL, &tessera_saved[i]) == 0;
	}
}

// tessera_restore_handlers puts back every handler that was replaced by one
// without SA_ONSTACK, and returns how many it restored.
static int tessera_restore_handlers(void) {
	int n = 0;
	for (int i = 1; i < TESSERA_NSIG; i++) {
		struct sigaction cur;
		if (!tessera_valid[i] || sigaction(i, NULL, &cur) != 0) {
			continue;
		}
		if ((void *)cur.sa_sigaction == (void *)tessera_saved[i].sa_sigaction) {
			continue;
		}
		if (cur.sa_flags & SA_ONSTACK) {
			continue;
		}
		if (sigaction(i, &tessera_saved[i], NULL) == 0) {
			n++;
		}
	}
	return n;
}

static void tessera_noop_handler(int sig) { (void)sig; }

// tessera_install_bare_handler installs a handler without SA_ONSTACK, as a
// careless C library would; only tests use it.
static int tessera_install_bare_handler(int sig) {
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = tessera_noop_handler;
	return sigaction(sig, &sa, NULL);
}

static int tessera_handler_onstack(int sig) {
	struct sigaction cur;
	if (sigaction(sig, NULL, &cur) != 0) return -1;
	return (cur.sa_flags & SA_ONSTACK) != 0;
}
*/
import "C"

import (
	"errors"
	"sync"
)

var signalMu sync.Mutex

// guardSignals runs fn and then restores any signal handler that fn's C code
// installed without SA_ONSTACK.
//
// CUDA and its libraries may install signal handlers when a CUDA session is
// created or first run. Go requires every handler to run on the alternate
// signal stack; a handler installed without SA_ONSTACK makes the Go runtime
// abort with "non-Go code set up signal handler without SA_ONSTACK flag" the
// next time that signal arrives (Ctrl-C during a batch, for instance). The
// handlers Go had are put back after each call that can load CUDA.
func guardSignals(fn func() error) (restored int, err error) {
	signalMu.Lock()
	defer signalMu.Unlock()
	C.tessera_save_handlers()
	err = fn()
	return int(C.tessera_restore_handlers()), err
}

// installBareHandler installs a C handler for sig without SA_ONSTACK, as a
// careless C library would. Tests use it to check guardSignals.
func installBareHandler(sig int) error {
	if C.tessera_install_bare_handler(C.int(sig)) != 0 {
		return errors.New("sigaction failed")
	}
	return nil
}

// handlerOnStack reports whether sig's current handler has SA_ONSTACK.
func handlerOnStack(sig int) bool { return C.tessera_handler_onstack(C.int(sig)) == 1 }
