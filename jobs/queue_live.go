package jobs

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// liveness tells whether the worker process with a River client ID still
// runs; each working process registers itself on open.
type liveness interface {
	alive(ctx context.Context, id string) (bool, error)
	close()
}

// fileLiveness holds an flock on DIR/ID.lock for the process's life; the
// kernel drops it when the process dies, whatever kills it.
type fileLiveness struct {
	dir  string
	own  *os.File
	path string
}

func newFileLiveness(dir, id string) (*fileLiveness, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("liveness lock: %w", err)
	}
	path := filepath.Join(dir, id+".lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("liveness lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("liveness lock %s: %w", path, err)
	}
	l := &fileLiveness{dir: dir, own: f, path: path}
	l.sweep(id)
	return l, nil
}

// sweep removes the lock files of processes that are gone.
func (l *fileLiveness) sweep(self string) {
	names, _ := filepath.Glob(filepath.Join(l.dir, "*.lock"))
	for _, p := range names {
		if id := strings.TrimSuffix(filepath.Base(p), ".lock"); id != self {
			l.alive(context.Background(), id)
		}
	}
}

func (l *fileLiveness) alive(ctx context.Context, id string) (bool, error) {
	if filepath.Base(id) != id {
		return true, nil // not one of ours: leave it to River's rescuer
	}
	path := filepath.Join(l.dir, id+".lock")
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	defer f.Close()
	err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	if errors.Is(err, syscall.EWOULDBLOCK) {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	os.Remove(path) // its owner is gone; the lock goes with f.Close
	return false, nil
}

func (l *fileLiveness) close() {
	os.Remove(l.path)
	l.own.Close()
}

// lockFile takes an exclusive flock on path, waiting for it; the returned
// function releases it.
func lockFile(path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, err
	}
	return func() { f.Close() }, nil
}

// pgLiveness holds a session advisory lock keyed by the client ID on a
// connection of its own; the server drops it when that connection ends.
type pgLiveness struct {
	pool *pgxpool.Pool
	conn *pgx.Conn
}

func livenessKey(id string) int64 {
	h := fnv.New64a()
	h.Write([]byte("tessera worker " + id))
	return int64(h.Sum64())
}

func newPGLiveness(ctx context.Context, pool *pgxpool.Pool, id string) (*pgLiveness, error) {
	c, err := pool.Acquire(ctx)
	if err != nil {
		return nil, fmt.Errorf("liveness lock: %w", err)
	}
	conn := c.Hijack()
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock($1)", livenessKey(id)); err != nil {
		conn.Close(ctx)
		return nil, fmt.Errorf("liveness lock: %w", err)
	}
	return &pgLiveness{pool: pool, conn: conn}, nil
}

func (l *pgLiveness) alive(ctx context.Context, id string) (bool, error) {
	c, err := l.pool.Acquire(ctx)
	if err != nil {
		return false, err
	}
	defer c.Release()
	key := livenessKey(id)
	var got bool
	if err := c.QueryRow(ctx, "SELECT pg_try_advisory_lock($1)", key).Scan(&got); err != nil {
		return false, err
	}
	if !got {
		return true, nil
	}
	_, err = c.Exec(ctx, "SELECT pg_advisory_unlock($1)", key)
	return false, err
}

func (l *pgLiveness) close() { l.conn.Close(context.Background()) }
