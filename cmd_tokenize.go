package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"tessera/models"
	"tessera/stages/tokenizer"
)

func newTokenizeCmd(a *app) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "tokenize MODEL PROMPT...",
		Short: "Show the token ids and pieces of prompts for a model's tokenizer",
		Long: `Tokenize prints, for each prompt, the token ids and pieces the model's
tokenizer makes of it, the ids the text encoder is fed (start and end
tokens, padding) and where a prompt too long for the encoder is cut.

MODEL is a pipeline folder or one of its models (its tokenizer/ folder is
used), a tokenizer folder (vocab.json and merges.txt), or CLIP's merge list
(bpe_simple_vocab_16e6.txt.gz).`,
		Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			r := models.Resolver{Dirs: a.cfg.Models.Dirs, AllowPaths: true}
			tok, _, err := r.Tokenizer(args[0])
			if err != nil {
				return fail(2, "%s", oneLine(err))
			}
			return printTokens(cmd.OutOrStdout(), tok, args[1:], asJSON)
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

// tokenized is one prompt as tokenize prints it.
type tokenized struct {
	Prompt string `json:"prompt"`
	tokenizer.Encoding
}

func printTokens(w io.Writer, tok tokenizer.Tokenizer, prompts []string, asJSON bool) error {
	var out []tokenized
	for _, p := range prompts {
		out = append(out, tokenized{Prompt: p, Encoding: tok.Encode(p)})
	}
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}
	for _, t := range out {
		fmt.Fprintf(w, "prompt:   %q\n", t.Prompt)
		fmt.Fprintf(w, "tokens:   %d (the encoder takes %d with its start and end tokens)\n", len(t.Tokens), tok.Length())
		var pieces []string
		for _, tk := range t.Tokens {
			pieces = append(pieces, fmt.Sprintf("%d:%s", tk.ID, tk.Piece))
		}
		fmt.Fprintf(w, "pieces:   %s\n", strings.Join(pieces, " "))
		ids := make([]string, len(t.IDs))
		for i, id := range t.IDs {
			ids[i] = fmt.Sprint(id)
		}
		fmt.Fprintf(w, "ids:      %s\n", strings.Join(ids, " "))
		if t.Truncated >= 0 {
			fmt.Fprintf(w, "cut:      after token %d; dropped %q\n", t.Truncated, t.CutText)
		}
		fmt.Fprintln(w)
	}
	return nil
}
