package main

// A minimal RFC 6455 client: the upgrade handshake, masked client frames, and a
// scanner for the server's (unmasked) frames. With -deflate, subscribers also
// offer permessage-deflate (as a browser does) and inflate compressed frames
// (deflate.go). Nothing else: no fragmentation (the servers under test send
// one message per frame), no UTF-8 validation. Event frames are not JSON-decoded: the scanner finds the few
// fields it counts ("type", "seq", "topic", and the payload's "t" stamp) by
// byte search, so that a delivery costs the load generator well under a
// microsecond of CPU.

import (
	"bytes"
	"crypto/rand"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"strconv"
	"syscall"
	"time"
)

const wsGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

const (
	opCont  = 0x0
	opText  = 0x1
	opBin   = 0x2
	opClose = 0x8
	opPing  = 0x9
	opPong  = 0xA
)

// maskFrame appends a masked client frame (FIN set) to dst.
func maskFrame(dst []byte, opcode byte, payload []byte, key [4]byte) []byte {
	n := len(payload)
	dst = append(dst, 0x80|opcode)
	switch {
	case n < 126:
		dst = append(dst, 0x80|byte(n))
	case n < 1<<16:
		dst = append(dst, 0x80|126, byte(n>>8), byte(n))
	default:
		var l [8]byte
		binary.BigEndian.PutUint64(l[:], uint64(n))
		dst = append(dst, 0x80|127)
		dst = append(dst, l[:]...)
	}
	dst = append(dst, key[:]...)
	start := len(dst)
	dst = append(dst, payload...)
	for i := range payload {
		dst[start+i] ^= key[i&3]
	}
	return dst
}

// maskKey is a cheap, varying mask key; the masking is for protocol
// conformance, not secrecy (everything runs on loopback).
var maskCounter uint32 = 0x9e3779b9

func maskKey() [4]byte {
	maskCounter = maskCounter*1664525 + 1013904223
	var k [4]byte
	binary.LittleEndian.PutUint32(k[:], maskCounter)
	return k
}

// frameAt parses the frame header at the start of b. It returns the opcode,
// FIN flag, the payload slice and the total frame length, or total == 0 when b
// does not yet hold the whole frame.
func frameAt(b []byte) (op byte, fin bool, payload []byte, total int, err error) {
	if len(b) < 2 {
		return 0, false, nil, 0, nil
	}
	b0, b1 := b[0], b[1]
	if b1&0x80 != 0 {
		return 0, false, nil, 0, errors.New("masked frame from server")
	}
	if b0&0x30 != 0 || (b0&0x40 != 0 && !deflateOn) {
		return 0, false, nil, 0, errors.New("RSV bits set (compression was not negotiated)")
	}
	n := int(b1 & 0x7f)
	hdr := 2
	switch n {
	case 126:
		if len(b) < 4 {
			return 0, false, nil, 0, nil
		}
		n = int(binary.BigEndian.Uint16(b[2:4]))
		hdr = 4
	case 127:
		if len(b) < 10 {
			return 0, false, nil, 0, nil
		}
		u := binary.BigEndian.Uint64(b[2:10])
		if u > 1<<30 {
			return 0, false, nil, 0, errors.New("frame too large")
		}
		n = int(u)
		hdr = 10
	}
	if len(b) < hdr+n {
		return 0, false, nil, 0, nil
	}
	return b0 & 0x0f, b0&0x80 != 0, b[hdr : hdr+n], hdr + n, nil
}

// valueAt returns the index just past `"key"`, the colon and any whitespace,
// searching from the first occurrence of the quoted key; -1 if absent.
func valueAt(p []byte, quotedKey []byte) int {
	off := 0
	for {
		i := bytes.Index(p[off:], quotedKey)
		if i < 0 {
			return -1
		}
		j := off + i + len(quotedKey)
		for j < len(p) && (p[j] == ' ' || p[j] == '\t' || p[j] == '\n' || p[j] == '\r') {
			j++
		}
		if j < len(p) && p[j] == ':' {
			j++
			for j < len(p) && (p[j] == ' ' || p[j] == '\t' || p[j] == '\n' || p[j] == '\r') {
				j++
			}
			return j
		}
		off = j // a string value equal to the key: keep looking
	}
}

// intAt parses a (possibly negative) decimal integer at p[i:]. A number
// written with a fraction or exponent (a JavaScript server re-encoding a
// 19-digit stamp keeps it an integer, but rounded) stops at the '.'/'e'.
func intAt(p []byte, i int) (int64, bool) {
	if i < 0 {
		return 0, false
	}
	for i < len(p) && p[i] == ' ' {
		i++
	}
	if i >= len(p) {
		return 0, false
	}
	neg := false
	if p[i] == '-' {
		neg = true
		i++
	}
	q := p[i:]
	var v int64
	n := 0
	for n < len(q) {
		c := q[n] - '0'
		if c > 9 {
			break
		}
		v = v*10 + int64(c)
		n++
	}
	if n == 0 {
		return 0, false
	}
	if neg {
		v = -v
	}
	return v, true
}

// stringAt returns the contents of the JSON string starting at p[i] (no
// escapes expected: topic names here are plain ASCII).
func stringAt(p []byte, i int) ([]byte, bool) {
	if i < 0 || i >= len(p) || p[i] != '"' {
		return nil, false
	}
	j := bytes.IndexByte(p[i+1:], '"')
	if j < 0 {
		return nil, false
	}
	return p[i+1 : i+1+j], true
}

var (
	keyType  = []byte(`"type"`)
	keySeq   = []byte(`"seq"`)
	keyTopic = []byte(`"topic"`)
	keyStamp = []byte(`"t"`)
	valEvent = []byte(`"event"`)
)

// anchored finds key (which must hold the byte rare at offset off) by
// scanning for that rare byte, which JSON punctuation and the load
// generator's payloads seldom contain; it returns the index just past the key,
// or -1. Much cheaper than bytes.Index on a needle starting with '"', which
// matches every few bytes of JSON.
func anchored(p []byte, from int, rare byte, off int, key []byte) int {
	for from < len(p) {
		i := bytes.IndexByte(p[from:], rare)
		if i < 0 {
			return -1
		}
		i += from
		st := i - off
		if st >= 0 && st+len(key) <= len(p) && string(p[st:st+len(key)]) == string(key) {
			return st + len(key)
		}
		from = i + 1
	}
	return -1
}

var (
	eventPrefix = []byte(`{"type":"event"`)
	seqColon    = []byte(`"seq":`)
	stampColon  = []byte(`{"t":`)
	topicColon  = []byte(`"topic":`)
)

// eventSeq returns an event's seq, by the fast path for the compact layout
// all four servers use, else by the general scan.
func eventSeq(p []byte) (int64, bool) {
	if i := anchored(p, len(eventPrefix), 'q', 3, seqColon); i >= 0 {
		return intAt(p, i)
	}
	return intAt(p, valueAt(p, keySeq))
}

// eventStamp returns the publisher's stamp, the payload's "t".
func eventStamp(p []byte) (int64, bool) {
	if i := anchored(p, 1, '{', 0, stampColon); i >= 0 {
		return intAt(p, i)
	}
	return intAt(p, valueAt(p, keyStamp))
}

// isEvent tells an event frame from the rest. Event payloads made by this
// load generator hold no "type" key, so the first "type" key is the envelope's.
func isEvent(p []byte) bool {
	if len(p) > len(eventPrefix) && string(p[:len(eventPrefix)]) == string(eventPrefix) {
		return true
	}
	i := valueAt(p, keyType)
	return i >= 0 && bytes.HasPrefix(p[i:], valEvent)
}

// --- blocking connection used for the handshake and the subscribe exchange ---

type setupConn struct {
	c   net.Conn
	buf []byte // bytes read but not consumed yet
}

func dialWS(addr, path string, timeout time.Duration) (*setupConn, error) {
	return dialWSExt(addr, path, timeout, false)
}

// dialWSExt is dialWS, offering permessage-deflate when deflate is set (and
// failing if the server does not accept it).
func dialWSExt(addr, path string, timeout time.Duration, deflate bool) (*setupConn, error) {
	deadline := time.Now().Add(timeout)
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return nil, err
	}
	_ = c.SetDeadline(deadline)
	var raw [16]byte
	_, _ = rand.Read(raw[:])
	key := base64.StdEncoding.EncodeToString(raw[:])
	req := "GET " + path + " HTTP/1.1\r\nHost: " + addr + "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: " + key + "\r\nSec-WebSocket-Version: 13\r\n"
	if deflate {
		req += "Sec-WebSocket-Extensions: " + deflateOffer + "\r\n"
	}
	req += "\r\n"
	if _, err := c.Write([]byte(req)); err != nil {
		c.Close()
		return nil, err
	}
	sum := sha1.Sum([]byte(key + wsGUID))
	accept := base64.StdEncoding.EncodeToString(sum[:])
	buf := make([]byte, 0, 4096)
	tmp := make([]byte, 4096)
	for {
		n, err := c.Read(tmp)
		if n > 0 {
			buf = append(buf, tmp[:n]...)
		}
		if end := bytes.Index(buf, []byte("\r\n\r\n")); end >= 0 {
			head := buf[:end]
			line := head
			if k := bytes.IndexByte(head, '\r'); k >= 0 {
				line = head[:k]
			}
			if !bytes.HasPrefix(line, []byte("HTTP/1.1 101")) {
				c.Close()
				return nil, fmt.Errorf("upgrade refused: %q", string(line))
			}
			if !bytes.Contains(bytes.ToLower(head), bytes.ToLower([]byte("sec-websocket-accept: "+accept))) {
				c.Close()
				return nil, errors.New("bad Sec-WebSocket-Accept")
			}
			if deflate && !bytes.Contains(bytes.ToLower(head), []byte("sec-websocket-extensions: permessage-deflate")) {
				c.Close()
				return nil, errors.New("permessage-deflate was not negotiated")
			}
			rest := append([]byte(nil), buf[end+4:]...)
			return &setupConn{c: c, buf: rest}, nil
		}
		if err != nil {
			c.Close()
			return nil, err
		}
		if len(buf) > 16384 {
			c.Close()
			return nil, errors.New("response head too large")
		}
	}
}

func (s *setupConn) writeText(p []byte) error {
	_, err := s.c.Write(maskFrame(nil, opText, p, maskKey()))
	return err
}

// readFrame returns the next complete data frame's payload, answering pings.
func (s *setupConn) readFrame() (byte, []byte, error) {
	tmp := make([]byte, 8192)
	for {
		op, _, payload, total, err := frameAt(s.buf)
		if err != nil {
			return 0, nil, err
		}
		if total > 0 {
			out := append([]byte(nil), payload...)
			s.buf = s.buf[total:]
			switch op {
			case opPing:
				if _, err := s.c.Write(maskFrame(nil, opPong, out, maskKey())); err != nil {
					return 0, nil, err
				}
				continue
			case opPong:
				continue
			case opClose:
				return opClose, out, errors.New("server closed the connection")
			}
			return op, out, nil
		}
		n, err := s.c.Read(tmp)
		if n > 0 {
			s.buf = append(s.buf, tmp[:n]...)
		}
		if err != nil && n == 0 {
			return 0, nil, err
		}
	}
}

// detach hands the socket over to the epoll loop: it duplicates the file
// descriptor, closes the net.Conn (which removes it from Go's own poller; the
// socket stays open through the duplicate) and makes the duplicate
// non-blocking. Bytes already read stay in s.buf.
func (s *setupConn) detach() (int, error) {
	tc, ok := s.c.(*net.TCPConn)
	if !ok {
		return -1, errors.New("not a TCP connection")
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var dupErr error
	err = rc.Control(func(orig uintptr) {
		fd, dupErr = syscall.Dup(int(orig))
	})
	if err != nil {
		return -1, err
	}
	if dupErr != nil {
		return -1, dupErr
	}
	syscall.CloseOnExec(fd)
	if err := syscall.SetNonblock(fd, true); err != nil {
		syscall.Close(fd)
		return -1, err
	}
	_ = s.c.SetDeadline(time.Time{})
	s.c.Close()
	return fd, nil
}

func itoa(v int64) string { return strconv.FormatInt(v, 10) }
