package pipeline

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
)

// aeRequest is one tile's Run of an autoencoder graph, waiting to be
// batched with the tiles of every item that decodes (or encodes) at the
// same time.
type aeRequest struct {
	ctx     context.Context
	in      []float32 // the tile's input, in3 (without the batch axis)
	in3     [3]int64  // its shape: channels, height, width
	out3    [3]int64  // the output's, with out3[0] the channels kept
	res     []float32 // the graph's whole output for the tile (outCh channels)
	err     error
	done    chan struct{}
	limited int // the caller's batch (the most tiles it wants in one Run)
}

// aeBatcher gathers the tile Runs of one graph from every caller into
// Runs of up to the batch its callers ask for (the smallest of those in
// the Run), on one goroutine per graph, started on first use and stopped
// by the engine's Close. A Run of several tiles that runs out of memory
// halves the batch, for aeRecoverRuns Runs. A cancelled caller's tiles
// leave the queue; a Run ends early only when every caller in it is
// cancelled (or the engine closes), as it carries their tiles together.
type aeBatcher struct {
	mu      sync.Mutex
	pending []*aeRequest
	wake    chan struct{} // buffered: a Run may be waiting
	started bool
	limit   int // 0: none; else the batch after an out-of-memory
	sinceOK int // successful Runs since the limit was set
}

// aeRecoverRuns is how many successful Runs lift an out-of-memory limit
// (which may have come from a moment when other models held the memory).
const aeRecoverRuns = 64

// runTiles runs reqs (each tile's input set) through s, batched with what
// other callers have waiting, and returns when each has its result, or at
// the first error (its other tiles then leave the queue).
func (e *Engine) runTiles(ctx context.Context, s *aeSession, reqs []*aeRequest) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	b := &s.batcher
	for _, r := range reqs {
		r.ctx, r.done = ctx, make(chan struct{})
	}
	if err := e.startBatcher(s); err != nil {
		return err
	}
	b.mu.Lock()
	if e.ctx.Err() != nil { // the loop has drained the queue, or will
		b.mu.Unlock()
		return errors.New("engine closed")
	}
	b.pending = append(b.pending, reqs...)
	b.mu.Unlock()
	select {
	case b.wake <- struct{}{}:
	default: // a wake-up is already waiting
	}
	for _, r := range reqs {
		select {
		case <-r.done:
		case <-ctx.Done():
			return ctx.Err()
		}
		if r.err != nil {
			return r.err
		}
	}
	return nil
}

// startBatcher starts s's batch loop on the engine's group, once, unless
// the engine is closed.
func (e *Engine) startBatcher(s *aeSession) error {
	b := &s.batcher
	e.mu.Lock() // Close sets closed under it before it waits for the group
	defer e.mu.Unlock()
	if e.closed {
		return errors.New("engine closed")
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.started {
		b.started, b.wake = true, make(chan struct{}, 1)
		e.group.Go(func() error { e.batchLoop(s); return nil })
	}
	return nil
}

// batchLoop runs batches while tiles wait, until the engine closes; the
// tiles still waiting then fail.
func (e *Engine) batchLoop(s *aeSession) {
	b := &s.batcher
	for {
		select {
		case <-e.ctx.Done():
			b.mu.Lock()
			for _, r := range b.pending {
				r.err = errors.New("engine closed")
				close(r.done)
			}
			b.pending = nil
			b.mu.Unlock()
			return
		case <-b.wake:
		}
		for e.runBatch(s) {
		}
	}
}

// runBatch runs one batch of the waiting tiles and reports whether there
// was one. A panic in it fails the batch's tiles, not the process.
func (e *Engine) runBatch(s *aeSession) (ran bool) {
	b := &s.batcher
	b.mu.Lock()
	// Cancelled callers' tiles leave the queue.
	b.pending = slices.DeleteFunc(b.pending, func(r *aeRequest) bool {
		if err := r.ctx.Err(); err != nil {
			r.err = err
			close(r.done)
			return true
		}
		return false
	})
	if len(b.pending) == 0 || e.ctx.Err() != nil {
		b.mu.Unlock()
		return false
	}
	// The first waiting tile's shape, and the waiting tiles of it, up to
	// the batch.
	first := b.pending[0]
	n := max(first.limited, 1)
	if b.limit > 0 {
		n = min(n, b.limit)
	}
	var batch, rest []*aeRequest
	for _, r := range b.pending {
		if len(batch) < n && r.in3 == first.in3 && r.out3 == first.out3 {
			batch = append(batch, r)
			n = min(n, max(r.limited, 1))
		} else {
			rest = append(rest, r)
		}
	}
	if len(batch) > n {
		rest = append(batch[n:], rest...)
		batch = batch[:n]
	}
	b.pending = rest
	b.mu.Unlock()

	delivered := false
	defer func() {
		if p := recover(); p != nil {
			e.logger.Error("panic in an autoencoder Run", "graph", s.path, "panic", p, "stack", string(debug.Stack()))
			if !delivered {
				for _, r := range batch {
					r.err = fmt.Errorf("internal error (panic): %v", p)
					close(r.done)
				}
			}
			ran = true
		}
	}()
	// The Run ends early when every caller in it has gone, or the engine.
	runCtx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	var left atomic.Int64
	left.Store(int64(len(batch)))
	for _, r := range batch {
		stop := context.AfterFunc(r.ctx, func() {
			if left.Add(-1) == 0 {
				cancel()
			}
		})
		defer stop()
	}
	per := int(first.in3[0] * first.in3[1] * first.in3[2])
	x := contiguous(batch, per)
	if x == nil { // tiles of several callers: gathered into one buffer
		x = make([]float32, 0, len(batch)*per)
		for _, r := range batch {
			x = append(x, r.in...)
		}
	}
	k := int64(len(batch))
	res, err := s.run(runCtx, x, []int64{k, first.in3[0], first.in3[1], first.in3[2]}, []int64{k, first.out3[0], first.out3[1], first.out3[2]})
	if err != nil && isOutOfMemory(err) && len(batch) > 1 {
		// A Run of several tiles did not fit: halve, and the tiles wait
		// again at the front.
		b.mu.Lock()
		b.limit, b.sinceOK = max(len(batch)/2, 1), 0
		limit := b.limit
		b.pending = append(batch, b.pending...)
		b.mu.Unlock()
		delivered = true
		e.logger.Warn("autoencoder ran out of memory; batch halved", "graph", s.path, "batch", limit, "err", err)
		return true
	}
	if err == nil {
		b.mu.Lock()
		if b.limit > 0 {
			if b.sinceOK++; b.sinceOK >= aeRecoverRuns {
				b.limit = 0
			}
		}
		b.mu.Unlock()
	}
	got := 0
	if err == nil {
		got = len(res) / len(batch)
	}
	delivered = true
	for i, r := range batch {
		if err != nil {
			r.err = err
		} else {
			r.res = res[i*got : (i+1)*got]
		}
		close(r.done)
	}
	return true
}

// contiguous is the batch's inputs as one slice when they already lie one
// after another in one caller's buffer (a batch of one item's tiles, the
// usual case), else nil.
func contiguous(batch []*aeRequest, per int) []float32 {
	in := batch[0].in
	if per == 0 || cap(in) < len(batch)*per {
		return nil
	}
	x := in[:len(batch)*per]
	for i, r := range batch {
		if len(r.in) != per || &r.in[0] != &x[i*per] {
			return nil
		}
	}
	return x
}
