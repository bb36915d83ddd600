package models

import "embed"

// The demo models: small U-Nets trained by tools/ on CC0, public-domain and
// CC-BY photographs (models/SOURCES.md), compiled into the binary so that a
// fresh machine can run the main job with nothing else installed.
//
//go:embed demo-base/model.onnx demo-base/tessera.yaml demo-sr/model.onnx demo-sr/tessera.yaml
var demoFS embed.FS

func init() {
	for _, name := range []string{"demo-base", "demo-sr"} {
		onnx, err := demoFS.ReadFile(name + "/model.onnx")
		if err != nil {
			panic(err) // the embed directive above guarantees the files
		}
		manifest, err := demoFS.ReadFile(name + "/tessera.yaml")
		if err != nil {
			panic(err)
		}
		embedded[name] = Embedded{Name: name, ONNX: onnx, Manifest: manifest}
	}
}

// BenchPhoto is the photograph `tessera bench` upscales (a 256² crop of
// skimage's chelsea, CC0; models/SOURCES.md), held out from the demo
// models' training. It is embedded so that bench runs from any directory.
//
//go:embed bench/chelsea-256.png
var BenchPhoto []byte

// BenchPhotoName is BenchPhoto's file name.
const BenchPhotoName = "chelsea-256.png"
