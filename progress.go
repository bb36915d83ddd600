package main

import (
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"tessera/pipeline"
)

// progress shows long work: on a terminal one status line redrawn in place
// (overall percentage with ETA, then each item in flight); otherwise a plain
// line per finished stage and item. Quiet prints nothing.
type progress struct {
	w      io.Writer
	tty    bool
	quiet  bool
	total  int
	began  time.Time
	mu     sync.Mutex
	done   int
	failed int
	items  map[int]pipeline.Progress
	last   time.Time
	width  int
}

func newProgress(w io.Writer, total int, quiet bool) *progress {
	tty := false
	if f, ok := w.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			tty = true
		}
	}
	return &progress{w: w, tty: tty, quiet: quiet, total: total, began: time.Now(), items: map[int]pipeline.Progress{}}
}

func (p *progress) start(it pipeline.Item) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.items[it.Index] = pipeline.Progress{Item: it.Index}
	if !p.tty && !p.quiet {
		fmt.Fprintf(p.w, "item %d (seed %d) -> %s: started\n", it.Index, it.Seed, it.Output)
	}
}

func (p *progress) step(ev pipeline.Progress) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.items[ev.Item] = ev
	switch {
	case p.quiet:
	case p.tty:
		if time.Since(p.last) > 150*time.Millisecond {
			p.redraw()
		}
	case ev.Step == ev.Steps:
		fmt.Fprintf(p.w, "item %d: stage %d/%d done (%d/%d tile evaluations)\n", ev.Item, ev.Stage+1, ev.Stages, ev.TileSteps, ev.TotalTiles)
	}
}

// finish ends an item: written, failed, or requeued (a stop was asked for).
func (p *progress) finish(it pipeline.Item, err error, requeued bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.items, it.Index)
	if !requeued { // a requeued item is not done: the next run makes it
		p.done++
	}
	if err != nil && !requeued {
		p.failed++
	}
	if p.quiet {
		return
	}
	if p.tty {
		p.clear()
	}
	switch {
	case requeued:
		fmt.Fprintf(p.w, "item %d (seed %d): stopped, requeued\n", it.Index, it.Seed)
	case err != nil:
		fmt.Fprintf(p.w, "item %d (seed %d): FAILED (%s): %v\n", it.Index, it.Seed, pipeline.Classify(err), err)
	default:
		fmt.Fprintf(p.w, "item %d (seed %d): wrote %s\n", it.Index, it.Seed, it.Output)
	}
	if p.tty {
		p.redraw()
	}
}

// fraction is the share of the run done, counting partial items.
func (p *progress) fraction() float64 {
	if p.total == 0 {
		return 1
	}
	f := float64(p.done)
	for _, ev := range p.items {
		if ev.TotalTiles > 0 {
			f += float64(ev.TileSteps) / float64(ev.TotalTiles)
		}
	}
	return f / float64(p.total)
}

func (p *progress) redraw() {
	p.last = time.Now()
	f := p.fraction()
	eta := "?"
	if el := time.Since(p.began); f > 0.01 {
		eta = (time.Duration(float64(el)/f) - el).Round(time.Second).String()
	}
	const barW = 24
	filled := int(f * barW)
	bar := strings.Repeat("█", filled) + strings.Repeat("░", barW-filled)
	var parts []string
	keys := make([]int, 0, len(p.items))
	for k := range p.items {
		keys = append(keys, k)
	}
	sort.Ints(keys)
	for _, k := range keys {
		ev := p.items[k]
		parts = append(parts, fmt.Sprintf("#%d s%d/%d %d/%d", k, ev.Stage+1, max(ev.Stages, 1), ev.Step, ev.Steps))
	}
	line := fmt.Sprintf("%s %3.0f%% %d/%d images, ETA %s  %s", bar, 100*f, p.done, p.total, eta, strings.Join(parts, "  "))
	p.clear()
	fmt.Fprint(p.w, line)
	p.width = len([]rune(line))
}

func (p *progress) clear() {
	if p.width > 0 {
		fmt.Fprintf(p.w, "\r%s\r", strings.Repeat(" ", p.width))
		p.width = 0
	}
}

// Write prints a log line (or lines) above the bar: the bar is cleared,
// the line printed, and the bar drawn again, all under the display's lock.
func (p *progress) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	drawn := p.width > 0
	p.clear()
	n, err := p.w.Write(b)
	if drawn {
		p.redraw()
	}
	return n, err
}

func (p *progress) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.tty {
		p.clear()
	}
}
