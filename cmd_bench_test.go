package main

import (
	"encoding/json"
	"testing"
)

// bench runs its fixed workload end to end and reports numbers that hang
// together: every item measured, the overhead at least 1 (wall covers the
// busy time), busy time the Run sum over lanes, and the SR model on lanes.
func TestBenchJSON(t *testing.T) {
	if testing.Short() {
		t.Skip("bench takes several seconds")
	}
	r := tessera(t, nil, "bench", "--json", "--image", "")
	if r.code != 0 {
		t.Fatalf("bench: %+v", r)
	}
	var rep benchReport
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatalf("bench --json: %v\n%s", err, r.stdout)
	}
	if len(rep.Items) != 2 || rep.Items[0].Width != 512 || rep.Items[1].Width != 1024 {
		t.Fatalf("items %+v", rep.Items)
	}
	for _, it := range rep.Items {
		if it.Overhead < 1 || it.BusySeconds <= 0 || it.BusySeconds > it.RunSeconds || it.TileSteps <= 0 || it.PeakRSSMiB <= 0 {
			t.Errorf("%s: %+v", it.Name, it)
		}
	}
	if s := rep.Items[1].SeamScore; s <= 0 || s > 1.10 {
		t.Errorf("seam score %v", s)
	}
	if rep.TileStepRatio <= 1 || rep.ScalingRatio <= 1 {
		t.Errorf("scaling %v, tile-step ratio %v", rep.ScalingRatio, rep.TileStepRatio)
	}
	lanes := map[string]int{}
	for _, m := range rep.Models {
		lanes[m.Model] = m.Lanes
		if m.Threads < 1 {
			t.Errorf("%s: %d threads", m.Model, m.Threads)
		}
	}
	if lanes["demo-base"] != 1 || lanes["demo-sr"] < 1 {
		t.Errorf("lanes %v", lanes)
	}
}
