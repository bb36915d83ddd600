//go:build !unix

package onnx

import "os"

// mapFile reads the file where mapping it is not available.
func mapFile(path string) ([]byte, func(), error) {
	data, err := os.ReadFile(path)
	return data, func() {}, err
}
