package pipeline

import (
	"bufio"
	"os"
	"strconv"
	"strings"
)

// The most rows auto picks: on a GPU larger batches keep the device busy;
// on a CPU they only grow the working set (measured with demo-sr on 256²
// tiles: 16 rows ran at 7.5 tiles/s where 4 ran at 12 to 14).
const (
	maxAutoBatchGPU = 16
	maxAutoBatchCPU = 4
)

// autoBatch picks how many tile rows fit one Run: the budget left after what
// the process holds now, divided by what one row of this shape cost in the
// probe Run (the growth of the resident set it caused, at least the row's
// own input and output), at most limit.
func autoBatch(budget, resident, probeGrowth, rowBytes int64, limit int) int {
	perRow := max(probeGrowth, 4*rowBytes)
	left := budget - resident
	if perRow <= 0 || left <= perRow {
		return 1
	}
	return int(min(left/perRow, int64(limit)))
}

// memoryBudget is the configured budget, or half of the memory the machine
// has available now when none is configured.
func memoryBudget(configured int64) int64 {
	if configured > 0 {
		return configured
	}
	if avail := meminfo("MemAvailable:"); avail > 0 {
		return avail / 2
	}
	return 1 << 30
}

// residentBytes is the process's resident set size now.
func residentBytes() int64 { return procStatus("/proc/self/status", "VmRSS:") }

// PeakResidentBytes is the process's peak resident set size (VmHWM), 0
// where the system does not say.
func PeakResidentBytes() int64 { return procStatus("/proc/self/status", "VmHWM:") }

// ResetPeakResident restarts the peak count from the present resident set,
// where Linux allows it, so that PeakResidentBytes measures what follows.
func ResetPeakResident() { os.WriteFile("/proc/self/clear_refs", []byte("5"), 0) }

func meminfo(key string) int64 { return procStatus("/proc/meminfo", key) }

// procStatus reads a "Key:   N kB" line of a /proc file, in bytes; 0 when absent.
func procStatus(path, key string) int64 {
	f, err := os.Open(path)
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), key); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err == nil {
				return kb << 10
			}
		}
	}
	return 0
}
