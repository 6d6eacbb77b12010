//go:build tools

// Package kubo pins the Kubo release MedLedger's devnet builds from the Go module proxy.
package kubo

import _ "github.com/ipfs/kubo/cmd/ipfs"
