package pipeline

import (
	"context"
	"errors"
	"fmt"
	"syscall"

	"tessera/onnx"
)

// ErrorClass says what kind of failure an error is, and so whether trying
// the item again can help. Errors are classified once, where they arise
// (Invalid, ModelUnusable, Environment), and read back with Classify.
type ErrorClass int

const (
	// ClassTransient may pass: a session that could not be created for
	// want of memory, a timeout, a disk that was full. Retried with backoff.
	ClassTransient ErrorClass = iota
	// ClassInvalid is bad input: an image that does not decode, a plan
	// that cannot be made, an output that would leave the output root.
	ClassInvalid
	// ClassModel is a model that cannot be used: missing, not ONNX, a bad
	// manifest, missing external data, a contract it does not fit.
	ClassModel
	// ClassEnvironment is this machine's set-up: an output root that
	// cannot be written, a file name the file system refuses, an execution
	// provider that cannot attach.
	ClassEnvironment
)

func (c ErrorClass) String() string {
	switch c {
	case ClassInvalid:
		return "invalid input"
	case ClassModel:
		return "model unusable"
	case ClassEnvironment:
		return "environment"
	}
	return "transient"
}

// Permanent reports whether an error of this class fails its item at once.
func (c ErrorClass) Permanent() bool { return c != ClassTransient }

// ClassError is an error with its class.
type ClassError struct {
	Class ErrorClass
	Err   error
}

func (e *ClassError) Error() string { return e.Err.Error() }
func (e *ClassError) Unwrap() error { return e.Err }

func classed(c ErrorClass, err error) error {
	if err == nil {
		return nil
	}
	var ce *ClassError
	if errors.As(err, &ce) {
		return err // classified where it arose
	}
	return &ClassError{Class: c, Err: err}
}

// Invalid marks err as bad input; nil stays nil.
func Invalid(err error) error { return classed(ClassInvalid, err) }

// Invalidf is Invalid(fmt.Errorf(format, args...)).
func Invalidf(format string, args ...any) error { return Invalid(fmt.Errorf(format, args...)) }

// ModelUnusable marks err as a model that cannot be used; nil stays nil.
func ModelUnusable(err error) error { return classed(ClassModel, err) }

// Environment marks err as a problem of the machine's set-up; nil stays nil.
func Environment(err error) error { return classed(ClassEnvironment, err) }

// Classify returns err's class: the one it was marked with, else
// ClassEnvironment for a provider that cannot attach and for the file
// system's permanent refusals (permission, read-only, name too long, not a
// directory), ClassModel for a session that could not be made for any
// reason but memory, else ClassTransient. A cancelled or timed-out context is
// always transient: the item may finish when tried again.
func Classify(err error) ErrorClass {
	if err == nil {
		return ClassTransient
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return ClassTransient
	}
	var ce *ClassError
	if errors.As(err, &ce) {
		return ce.Class
	}
	var pe *onnx.ProviderError
	if errors.As(err, &pe) {
		return ClassEnvironment
	}
	var se *SessionError
	if errors.As(err, &se) {
		// A device short of memory may have room later; a session that
		// cannot be made for any other reason (corrupt weights, a truncated
		// .onnx_data, an operator the runtime lacks) never will.
		if isOutOfMemory(se.Err) {
			return ClassTransient
		}
		return ClassModel
	}
	for _, errno := range []syscall.Errno{syscall.EACCES, syscall.EPERM, syscall.EROFS, syscall.ENAMETOOLONG, syscall.ENOTDIR} {
		if errors.Is(err, errno) {
			return ClassEnvironment
		}
	}
	return ClassTransient
}
