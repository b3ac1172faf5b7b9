package main

import (
	"bytes"
	"compress/flate"
	"strings"
	"testing"
)

func TestEventScan(t *testing.T) {
	frames := []string{
		// tidings
		`{"type":"event","topic":"bench","seq":17,"epoch":"f564e290","payload":{"t":1795328203610675639,"pad":"xx"},"timestamp":"2026-11-22T06:16:43.611Z"}`,
		// websockets, ws, gorilla
		`{"type":"event","topic":"bench","seq":17,"payload":{"t":1795328203610675639,"pad":"xx"},"timestamp":"2026-11-22T06:16:45.694Z"}`,
		// another key order, with spaces (Python's json.dumps defaults)
		`{"topic": "bench", "payload": {"pad": "xx", "t": 1795328203610675639}, "seq": 17, "type": "event"}`,
	}
	for _, f := range frames {
		p := []byte(f)
		if !isEvent(p) {
			t.Errorf("not an event: %s", f)
		}
		if seq, ok := eventSeq(p); !ok || seq != 17 {
			t.Errorf("seq %d %v in %s", seq, ok, f)
		}
		if st, ok := eventStamp(p); !ok || st != 1795328203610675639 {
			t.Errorf("stamp %d %v in %s", st, ok, f)
		}
		v, ok := stringAt(p, valueAt(p, keyTopic))
		if !ok || string(v) != "bench" {
			t.Errorf("topic %q in %s", v, f)
		}
	}
	for _, f := range []string{
		`{"type":"response","topic":"bench","payload":{"status":"published","seq":3},"requestId":1}`,
		`{"payload":{"status":"subscribed","seq":0},"type":"response"}`,
	} {
		if isEvent([]byte(f)) {
			t.Errorf("taken for an event: %s", f)
		}
	}
}

func TestFrames(t *testing.T) {
	for _, n := range []int{0, 5, 125, 126, 1000, 70000} {
		payload := make([]byte, n)
		for i := range payload {
			payload[i] = byte('a' + i%26)
		}
		// a server frame is an unmasked client frame: build it by hand
		var b []byte
		switch {
		case n < 126:
			b = append(b, 0x81, byte(n))
		case n < 1<<16:
			b = append(b, 0x81, 126, byte(n>>8), byte(n))
		default:
			b = append(b, 0x81, 127, 0, 0, 0, 0, byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
		}
		b = append(b, payload...)
		for cut := 0; cut < len(b); cut += 1 + len(b)/7 {
			if _, _, _, total, err := frameAt(b[:cut]); err != nil || total != 0 {
				t.Fatalf("n=%d cut=%d: total %d err %v", n, cut, total, err)
			}
		}
		op, fin, p, total, err := frameAt(b)
		if err != nil || op != opText || !fin || total != len(b) || string(p) != string(payload) {
			t.Fatalf("n=%d: op %d fin %v total %d err %v", n, op, fin, total, err)
		}
		// masking round trip
		m := maskFrame(nil, opText, payload, [4]byte{1, 2, 3, 4})
		if m[1]&0x80 == 0 {
			t.Fatal("client frame not masked")
		}
	}
}

func TestHist(t *testing.T) {
	h := newHist()
	for v := int64(1); v <= 100000; v++ {
		h.add(v * 1000) // 1 µs .. 100 ms
	}
	for _, c := range []struct{ q, want float64 }{{0.5, 50e6}, {0.99, 99e6}, {0.999, 99.9e6}} {
		got := h.quantile(c.q)
		if got < c.want*0.99 || got > c.want*1.01 {
			t.Errorf("q%.3f = %.0f, want %.0f ± 1%%", c.q, got, c.want)
		}
	}
}

func TestInflateReadsWhatASyncFlushedDeflateWrote(t *testing.T) {
	message := []byte(`{"type":"event","topic":"bench","seq":7,"payload":{"t":1,"pad":"` + padding(1000, true) + `"}}`)
	var compressed bytes.Buffer
	w, _ := flate.NewWriter(&compressed, flate.DefaultCompression)
	_, _ = w.Write(message)
	_ = w.Flush() // a sync flush: ends with 00 00 ff ff, which the wire leaves out
	payload := bytes.TrimSuffix(compressed.Bytes(), syncTail)
	f := newInflater()
	for i := 0; i < 3; i++ { // the same bytes again: read from the cache
		out, ok := f.inflate(payload)
		if !ok || !bytes.Equal(out, message) {
			t.Fatalf("inflate %d: %v %q", i, ok, out)
		}
	}
	if f.frames != 3 || f.hits != 2 {
		t.Fatalf("frames %d hits %d", f.frames, f.hits)
	}
	if seq, ok := eventSeq(message); !ok || seq != 7 {
		t.Fatalf("seq %d", seq)
	}
	if len(payload) > len(message)/2 {
		t.Fatalf("text padding compresses too little to be realistic? %d of %d", len(payload), len(message))
	}
}

func TestTextPaddingIsJSONSafeAndOfTheAskedLength(t *testing.T) {
	pad := padding(1024, true)
	if len(pad) != 1024 || strings.ContainsAny(pad, "\"\\\n") {
		t.Fatalf("bad padding %q", pad)
	}
}
