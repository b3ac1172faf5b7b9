package main

import (
	"errors"
	"fmt"
	"io"
	"testing"
)

func TestStormStreamCheck(t *testing.T) {
	seq := func(v int64) *int64 { return &v }
	c := &stormClient{epoch: "e1", last: 3}
	for _, s := range []int64{4, 5, 7, 7, 6, 8} {
		c.onEvent(&frameMsg{Type: "event", Seq: seq(s), Epoch: "e1"})
	}
	if c.last != 8 || c.gaps != 1 || c.dups != 2 || c.events != 6 {
		t.Errorf("last %d gaps %d dups %d events %d", c.last, c.gaps, c.dups, c.events)
	}
	c.onEvent(&frameMsg{Type: "event", Seq: seq(1), Epoch: "e2"})
	if c.epochChg != 1 || c.last != 1 || c.epoch != "e2" {
		t.Errorf("epoch change not counted: %+v", c)
	}
}

func TestStormRefusalReason(t *testing.T) {
	cases := map[string]error{
		"HTTP/1.1 503 Service Unavailable":                 fmt.Errorf("upgrade refused: %q", "HTTP/1.1 503 Service Unavailable"),
		"closed before the upgrade was answered":           io.EOF,
		"connection refused (nothing listening)":           errors.New("dial tcp 127.0.0.1:1: connect: connection refused"),
		"subscribe refused: unavailable try again":         errors.New("subscribe refused: unavailable try again"),
		"connection reset before the upgrade was answered": errors.New("read tcp: read: connection reset by peer"),
	}
	for want, err := range cases {
		if got := refusalReason(err); got != want {
			t.Errorf("refusalReason(%v) = %q, want %q", err, got, want)
		}
	}
	if code, reason := closeOf([]byte{0x03, 0xe9, 'b', 'y', 'e'}); code != 1001 || reason != "bye" {
		t.Errorf("closeOf: %d %q", code, reason)
	}
	if _, _, err := parseStormURL("tcp://x"); err == nil {
		t.Error("parseStormURL took a tcp:// URL")
	}
}
