package main

// permessage-deflate (RFC 7692) on the subscriber side, for -deflate: the
// offer a browser makes, and inflating what the server compressed.
//
// A server that compresses once per event sends every subscriber the same
// bytes, so the inflater keeps what it inflated by those bytes and inflates
// each distinct frame once: the load generator measures the server, and
// inflating the same frame for each of a thousand subscribers would make it
// the bottleneck. A frame it has not seen is inflated in full, so a server
// that compressed per connection is still read correctly, only slower.

import (
	"bytes"
	"compress/flate"
	"errors"
	"io"
)

// deflateOn is -deflate: subscribers offer permessage-deflate and accept RSV1 frames.
var deflateOn = false

// deflateOffer is what Chromium offers.
const deflateOffer = "permessage-deflate; client_max_window_bits"

// inflateCacheSize bounds the frames kept (the events of the last moment).
const inflateCacheSize = 4096

type inflater struct {
	cache  map[string][]byte
	frames int64 // compressed frames received
	hits   int64 // of them, inflated before (the same bytes as another subscriber's)
	reader io.ReadCloser
	src    bytes.Reader
	out    bytes.Buffer
}

func newInflater() *inflater {
	return &inflater{cache: make(map[string][]byte, inflateCacheSize)}
}

var syncTail = []byte{0x00, 0x00, 0xff, 0xff}

// inflate returns the message a compressed frame's payload holds.
func (f *inflater) inflate(payload []byte) ([]byte, bool) {
	f.frames++
	if out, ok := f.cache[string(payload)]; ok {
		f.hits++
		return out, true
	}
	data := make([]byte, 0, len(payload)+len(syncTail))
	data = append(append(data, payload...), syncTail...)
	f.src.Reset(data)
	if f.reader == nil {
		f.reader = flate.NewReader(&f.src)
	} else if err := f.reader.(flate.Resetter).Reset(&f.src, nil); err != nil {
		return nil, false
	}
	f.out.Reset()
	// The message ends with a sync flush, not a final block: the reader reports
	// the end of its input as an unexpected EOF once it has returned everything.
	if _, err := io.Copy(&f.out, f.reader); err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		return nil, false
	}
	out := append([]byte(nil), f.out.Bytes()...)
	if len(f.cache) >= inflateCacheSize {
		f.cache = make(map[string][]byte, inflateCacheSize)
	}
	f.cache[string(payload)] = out
	return out, true
}
