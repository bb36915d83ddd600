package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"tessera/config"
	"tessera/pipeline"
)

// A log line written while the bar is drawn lands on a line of its own,
// with the bar cleared before it and drawn again after it.
func TestProgressKeepsLogLinesOffTheBar(t *testing.T) {
	var buf bytes.Buffer
	p := &progress{w: &buf, tty: true, total: 2, began: time.Now(), items: map[int]pipeline.Progress{}}
	p.start(pipeline.Item{Index: 0})
	p.step(pipeline.Progress{Item: 0, Stage: 0, Stages: 2, Step: 3, Steps: 10, TileSteps: 3, TotalTiles: 20})
	if !strings.Contains(buf.String(), "0/2 images") {
		t.Fatalf("no bar drawn: %q", buf.String())
	}
	log := newLogger(config.Log{Level: "info"}, p)
	before := buf.Len()
	log.Info("model session ready")
	out := buf.String()[before:]
	i := strings.Index(out, "time=")
	if i < 0 {
		t.Fatalf("no log line: %q", out)
	}
	// Before the line: only the clearing of the bar, ending in a carriage
	// return, so the line starts at the left margin on an empty line.
	if cleared := out[:i]; strings.TrimSpace(cleared) != "" || !strings.HasSuffix(cleared, "\r") {
		t.Errorf("the log line does not start on a cleared line: %q", cleared)
	}
	line, after, ok := strings.Cut(out[i:], "\n")
	if !ok || !strings.Contains(line, "msg=\"model session ready\"") || strings.Contains(line, "█") || strings.Contains(line, "░") {
		t.Errorf("log line torn or mixed with the bar: %q", line)
	}
	if !strings.Contains(after, "0/2 images") || strings.Contains(after, "\n") {
		t.Errorf("bar not drawn again below the line: %q", after)
	}
	// Once the display is closed, lines go straight through.
	p.close()
	before = buf.Len()
	log.Info("stopped")
	if out := buf.String()[before:]; !strings.HasPrefix(out, "time=") {
		t.Errorf("after close: %q", out)
	}
}
