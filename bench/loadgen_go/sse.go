package main

// Server-Sent Events subscribers, for -sse: each subscriber opens
// GET /sse?topic=... (tidings' stream endpoint) instead of a WebSocket, and
// reads `data:` lines; the publisher still publishes over a WebSocket. An
// event's `data:` line holds the same JSON envelope a WebSocket frame does,
// so everything after the framing (seq, order, gaps, latency) is counted by
// the same code. The id lines (one per event, naming every topic's position)
// and the heartbeat comments count as wire bytes, not as events.

import (
	"bytes"
	"errors"
	"net"
	"net/url"
	"time"
)

// sseOn is -sse.
var sseOn = false

// ssePath is where the streams are (-sse-path).
var ssePath = "/sse"

var (
	blockEnd   = []byte("\n\n")
	dataPrefix = []byte("data: ")
)

// dialSSE opens a stream of topics and waits for its first block (the retry
// and starting id the server writes once it has subscribed): from then on no
// event is missed. Bytes read past that block are returned for the loop.
func dialSSE(addr string, topics []string, timeout time.Duration) (net.Conn, []byte, error) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return nil, nil, err
	}
	_ = c.SetDeadline(time.Now().Add(timeout))
	q := url.Values{}
	for _, t := range topics {
		q.Add("topic", t)
	}
	req := "GET " + ssePath + "?" + q.Encode() + " HTTP/1.1\r\nHost: " + addr + "\r\nAccept: text/event-stream\r\n\r\n"
	if _, err := c.Write([]byte(req)); err != nil {
		c.Close()
		return nil, nil, err
	}
	buf := make([]byte, 0, 4096)
	tmp := make([]byte, 4096)
	head := -1
	for {
		n, err := c.Read(tmp)
		buf = append(buf, tmp[:n]...)
		if head < 0 {
			if end := bytes.Index(buf, []byte("\r\n\r\n")); end >= 0 {
				if !bytes.HasPrefix(buf, []byte("HTTP/1.1 200")) {
					c.Close()
					line := buf[:bytes.IndexByte(buf, '\r')]
					return nil, nil, errors.New("stream refused: " + string(line))
				}
				buf = buf[end+4:]
				head = 0
			}
		}
		if head >= 0 {
			if end := bytes.Index(buf, blockEnd); end >= 0 {
				rest := append([]byte(nil), buf[end+2:]...)
				return c, rest, nil
			}
		}
		if err != nil {
			c.Close()
			return nil, nil, err
		}
		if len(buf) > 65536 {
			c.Close()
			return nil, nil, errors.New("no stream start within 64 KiB")
		}
	}
}

// scanSSE hands every complete block's data line to onText; an incomplete
// block waits for the next read.
func (l *loop) scanSSE(s *sub, b []byte, now int64) {
	for {
		end := bytes.Index(b, blockEnd)
		if end < 0 {
			break
		}
		block := b[:end]
		b = b[end+2:]
		for len(block) > 0 {
			line := block
			if i := bytes.IndexByte(block, '\n'); i >= 0 {
				line, block = block[:i], block[i+1:]
			} else {
				block = nil
			}
			if bytes.HasPrefix(line, dataPrefix) {
				l.onText(s, line[len(dataPrefix):], now)
			}
		}
	}
	if len(b) > 0 {
		s.partial = append(s.partial[:0], b...)
	}
}
