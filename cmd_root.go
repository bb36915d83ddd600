package main

import "github.com/spf13/cobra"

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "tessera",
		Short:         "Cascaded diffusion image generation with tiled super-resolution",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	return root
}
