package main

import (
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"

	"tessera/onnx"
)

func newVersionCmd(a *app) *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print Tessera's version and the ONNX Runtime it loads",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			out := cmd.OutOrStdout()
			v := version
			if bi, ok := debug.ReadBuildInfo(); ok && v == "dev" {
				for _, s := range bi.Settings {
					if s.Key == "vcs.revision" && len(s.Value) >= 12 {
						v = "dev+" + s.Value[:12]
					}
				}
			}
			fmt.Fprintf(out, "tessera %s (%s, %s/%s)\n", v, runtime.Version(), runtime.GOOS, runtime.GOARCH)
			env, err := onnx.Open(a.cfg.Runtime, a.logger)
			if err != nil {
				fmt.Fprintf(out, "onnx runtime: not loaded\n")
				return err
			}
			defer env.Close()
			fmt.Fprintf(out, "onnx runtime %s (%s, found via %s)\n", env.Version, env.Library.Path, env.Library.Source)
			fmt.Fprintf(out, "execution providers: %v (fallback %v)\n", a.cfg.Runtime.Providers, a.cfg.Runtime.Fallback)
			return nil
		},
	}
}
