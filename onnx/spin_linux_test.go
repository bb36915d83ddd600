package onnx

import (
	"syscall"
	"testing"
	"time"

	"tessera/config"
)

// cpuTime is the CPU time this process has used, user and system.
func cpuTime(t *testing.T) time.Duration {
	t.Helper()
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// TestLoneSessionStopsSpinningAfterRun: a session alone on the CPU lets its
// workers spin between operators, but not after its Run returns. Left
// spinning they held every core while the pipeline set up the next stage
// (a 512² stage's noise took twice as long).
func TestLoneSessionStopsSpinningAfterRun(t *testing.T) {
	m := loadFixture(t, "conv-sr")
	rt := config.Default().Runtime
	rt.Threads = 2
	s := newSession(t, m, &rt)
	in := srInputs(m, 1, 256, 256, 1, 500)
	var worst time.Duration
	for i := 0; i < 3; i++ {
		if _, err := s.Run(in); err != nil {
			t.Fatal(err)
		}
		before := cpuTime(t)
		time.Sleep(100 * time.Millisecond)
		used := cpuTime(t) - before
		t.Logf("CPU time in the 100 ms after Run %d: %v", i, used)
		worst = max(worst, used)
	}
	if worst > 30*time.Millisecond {
		t.Errorf("the process used %v of CPU in the 100 ms after a Run returned: ONNX Runtime's workers kept spinning", worst)
	}
}
