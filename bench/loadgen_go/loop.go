package main

// The event loop: one goroutine, one epoll instance (level-triggered), one
// shared read buffer. Every subscriber socket and the publisher's socket are
// served here, so a delivery costs one share of a read(2) plus a byte scan,
// and nothing is scheduled by Go's runtime poller while a phase runs.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

type topicRecv struct {
	first, last int64 // first and highest seq received
	count       int64 // events received
	ooo         int64 // events whose seq was not above the previous one
	gaps        int64 // seqs skipped inside the stream
}

type sub struct {
	fd      int
	idx     int
	partial []byte // an incomplete frame carried to the next read
	out     []byte // pong bytes not yet written
	nt      int    // topics subscribed: 1 or 2
	tname   [2][]byte
	tidx    [2]int // index into loop.topics
	tp      [2]topicRecv
	closed  bool
	seen    int64 // events seen, for --sample-every
	group   int   // index into -sub-urls (0 without it)
	sse     bool  // a Server-Sent Events stream (-sse), not a WebSocket
}

type topicPub struct {
	name        string
	first, last int64 // lowest and highest seq acknowledged by the server
	acked       int64
	sent        int64
	subscribers int64
}

// expectedFromAcks is the deliveries owed for the acknowledged seq ranges.
func (l *loop) expectedFromAcks() int64 {
	var e int64
	for _, tp := range l.topics {
		if tp.acked > 0 {
			e += tp.subscribers * (tp.last - tp.first + 1)
		}
	}
	return e
}

// stream is one open-loop publishing schedule.
type stream struct {
	interval int64 // ns between publishes
	nextDue  int64
	topicOf  func(k int64) int // topic index of the k-th publish of this stream
	sent     int64
}

type pubConn struct {
	fd          int
	partial     []byte
	out         []byte
	wantOut     bool
	nextReq     int64
	sent        int64
	acked       int64
	errors      int64
	errSamples  []string
	inflight    int
	firstSendNs int64
	lastSendNs  int64
	maxLagNs    int64
	sumLagNs    float64
	lagged      int64 // publishes sent more than 1 ms behind schedule
	scratch     []byte
	frame       []byte
}

type plan struct {
	mode         string // "max" or "rate"
	duration     time.Duration
	inflight     int
	streams      []*stream
	pad          string
	drainTimeout time.Duration
	settle       time.Duration
	sampleEvery  int64
}

const (
	stIdle = iota
	stPublishing
	stDraining
)

const pubTag = int32(-1)

type loop struct {
	ep        int
	events    []syscall.EpollEvent
	rbuf      []byte
	subs      []*sub
	topics    []*topicPub
	topicByNm map[string]int

	newSubs    chan *sub
	registered int64 // atomic
	stop       int32 // atomic
	done       chan struct{}

	pub    *pubConn
	planCh chan *plan
	pl     *plan
	result chan map[string]any

	state        int
	startNs      int64
	endNs        int64
	snapStart    snapshot
	snapPubEnd   snapshot
	phaseTimeout int64
	drainStartNs int64
	lastProgress int64
	lastTotal    int64
	expected     int64
	drainHow     string

	serverPid   int
	rssPeak     int64
	nextRssNs   int64
	sampleEvery int64

	hist        *hist
	groups      int     // -sub-urls given: subscribers per URL are also counted apart
	groupHist   []*hist // latency per -sub-urls entry
	groupTotal  []int64 // events received per -sub-urls entry
	total       int64   // events received while a phase ran (and before)
	totalAtomic int64
	firstRecvNs int64
	lastRecvNs  int64
	disconnects int64
	pongs       int64
	pongFails   int64
	otherFrames int64
	badFrames   int64
	wrongTopic  int64
	errFrames   int64
	errSamples  []string
	readErrors  map[string]int64
	frameErrors int64
	reads       int64 // successful subscriber reads while a phase ran
	wireBytes   int64 // bytes subscribers read while a phase ran (frames as sent)
	inflater    *inflater
	epollWaits  int64

	// read coalescing under load (see run)
	batchWait int64 // ns to pause between epoll rounds when hot; 0: never
	hotEvents int64 // events per 20 ms window that make the loop hot
	winStart  int64
	winEvents int64
	hot       bool
	pauses    int64
}

func newLoop(serverPid int) (*loop, error) {
	ep, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	return &loop{
		ep:          ep,
		events:      make([]syscall.EpollEvent, 1024),
		rbuf:        make([]byte, 256*1024),
		topicByNm:   map[string]int{},
		newSubs:     make(chan *sub, 20000),
		done:        make(chan struct{}),
		planCh:      make(chan *plan, 1),
		result:      make(chan map[string]any, 1),
		serverPid:   serverPid,
		hist:        newHist(),
		readErrors:  map[string]int64{},
		sampleEvery: 1,
	}, nil
}

func (l *loop) topicIndex(name string) int {
	if i, ok := l.topicByNm[name]; ok {
		return i
	}
	l.topics = append(l.topics, &topicPub{name: name})
	l.topicByNm[name] = len(l.topics) - 1
	return len(l.topics) - 1
}

var errNoPwait2 = errors.New("epoll_pwait2 unavailable")
var havePwait2 = true

// epollWait waits at most timeoutNs (epoll_pwait2 for sub-millisecond
// timeouts where the kernel has it, epoll_wait otherwise).
func (l *loop) epollWait(timeoutNs int64) (int, error) {
	if timeoutNs < 0 {
		timeoutNs = 0
	}
	if havePwait2 {
		ts := syscall.NsecToTimespec(timeoutNs)
		r, _, e := syscall.Syscall6(441, uintptr(l.ep), uintptr(unsafe.Pointer(&l.events[0])),
			uintptr(len(l.events)), uintptr(unsafe.Pointer(&ts)), 0, 0)
		if e == syscall.ENOSYS {
			havePwait2 = false
		} else if e != 0 {
			return 0, e
		} else {
			return int(r), nil
		}
	}
	msec := int((timeoutNs + 999999) / 1000000)
	return syscall.EpollWait(l.ep, l.events, msec)
}

func (l *loop) run() {
	defer close(l.done)
	// One OS thread for the loop, with a 1 µs timer slack so that the
	// coalescing pause below lasts what it says (the default slack is 50 µs).
	runtime.LockOSThread()
	_, _, _ = syscall.RawSyscall(syscall.SYS_PRCTL, 29 /* PR_SET_TIMERSLACK */, 1000, 0)
	for atomic.LoadInt32(&l.stop) == 0 {
		l.adopt()
		if l.pl == nil {
			select {
			case p := <-l.planCh:
				l.begin(p)
			default:
			}
		}
		timeout := int64(50 * time.Millisecond)
		if l.state != stIdle {
			timeout = l.step(nowNs())
		}
		n, err := l.epollWait(timeout)
		l.epollWaits++
		if err != nil {
			if err == syscall.EINTR {
				continue
			}
			l.readErrors["epoll: "+err.Error()]++
			time.Sleep(time.Millisecond)
			continue
		}
		eventsBefore := l.total
		for i := 0; i < n; i++ {
			ev := &l.events[i]
			if ev.Fd == pubTag {
				l.servePub(ev.Events)
				continue
			}
			s := l.subs[ev.Fd]
			if s.closed {
				continue
			}
			l.serveSub(s)
		}
		atomic.StoreInt64(&l.totalAtomic, l.total)
		// Under a sustained flood of deliveries, epoll_wait would return as
		// soon as one socket is readable: the loop would spend an epoll_wait
		// and a read(2) per frame or two, and, sleeping in epoll_wait, it
		// would make the server pay a wake-up of this process on nearly every
		// write. So while the loop is hot (at least hotEvents events in the
		// last 20 ms window), it pauses batchWait after each round that did
		// not fill the event array: frames pile up meanwhile and each read
		// takes more of them. This adds at most batchWait to the latency of
		// those events; a quiet loop (latency-100) never pauses.
		if l.batchWait > 0 && l.state != stIdle {
			l.winEvents += l.total - eventsBefore
			now := nowNs()
			if now-l.winStart >= int64(20*time.Millisecond) {
				l.hot = l.winEvents >= l.hotEvents
				l.winStart, l.winEvents = now, 0
			}
			if l.hot && n < len(l.events) {
				ts := syscall.NsecToTimespec(l.batchWait)
				_ = syscall.Nanosleep(&ts, nil)
				l.pauses++
			}
		}
	}
}

// adopt registers the subscribers that finished their handshake.
func (l *loop) adopt() {
	for {
		select {
		case s := <-l.newSubs:
			s.idx = len(l.subs)
			l.subs = append(l.subs, s)
			for k := 0; k < s.nt; k++ {
				l.topics[s.tidx[k]].subscribers++
			}
			ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLRDHUP, Fd: int32(s.idx)}
			if err := syscall.EpollCtl(l.ep, syscall.EPOLL_CTL_ADD, s.fd, &ev); err != nil {
				l.readErrors["epoll_ctl: "+err.Error()]++
				l.closeSub(s)
			} else if len(s.partial) > 0 {
				buf := s.partial
				s.partial = nil
				l.scanSub(s, buf, nowNs())
			}
			atomic.AddInt64(&l.registered, 1)
		default:
			return
		}
	}
}

func (l *loop) closeSub(s *sub) {
	if s.closed {
		return
	}
	s.closed = true
	_ = syscall.EpollCtl(l.ep, syscall.EPOLL_CTL_DEL, s.fd, nil)
	syscall.Close(s.fd)
	l.disconnects++
}

func (l *loop) serveSub(s *sub) {
	buf := l.rbuf
	n0 := 0
	if len(s.partial) > 0 {
		if len(s.partial) > len(buf)/2 {
			bigger := make([]byte, 2*len(s.partial)+len(buf))
			buf = bigger
		}
		n0 = copy(buf, s.partial)
		s.partial = s.partial[:0]
	}
	r, err := syscall.Read(s.fd, buf[n0:])
	if err != nil {
		if err == syscall.EAGAIN || err == syscall.EINTR {
			if n0 > 0 {
				s.partial = append(s.partial, buf[:n0]...)
			}
			return
		}
		l.readErrors[err.Error()]++
		l.closeSub(s)
		return
	}
	if r == 0 {
		l.closeSub(s)
		return
	}
	l.reads++
	l.wireBytes += int64(r)
	l.scanSub(s, buf[:n0+r], nowNs())
	if len(s.out) > 0 && !s.closed {
		l.flushSub(s)
	}
}

func (l *loop) scanSub(s *sub, b []byte, now int64) {
	if s.sse {
		l.scanSSE(s, b, now)
		return
	}
	for len(b) > 0 {
		op, fin, payload, total, err := frameAt(b)
		if err != nil {
			l.frameErrors++
			l.closeSub(s)
			return
		}
		if total == 0 {
			break
		}
		switch op {
		case opText:
			if !fin {
				l.frameErrors++ // fragmented messages are not expected from these servers
			}
			if b[0]&0x40 != 0 { // compressed (permessage-deflate)
				var ok bool
				if payload, ok = l.inflater.inflate(payload); !ok {
					l.frameErrors++
					l.closeSub(s)
					return
				}
			}
			l.onText(s, payload, now)
		case opPing:
			s.out = maskFrame(s.out, opPong, payload, maskKey())
			l.pongs++
			l.flushSub(s)
		case opPong:
		case opClose:
			l.closeSub(s)
			return
		default:
			l.otherFrames++
		}
		b = b[total:]
	}
	if len(b) > 0 {
		s.partial = append(s.partial[:0], b...)
	}
}

func (l *loop) flushSub(s *sub) {
	for len(s.out) > 0 {
		n, err := syscall.Write(s.fd, s.out)
		if err != nil {
			if err != syscall.EAGAIN && err != syscall.EINTR {
				l.pongFails++
				s.out = s.out[:0]
			}
			return
		}
		s.out = s.out[n:]
	}
	s.out = nil
}

var dumpFrames = 0 // -dump-frames: print the first N text frames a subscriber gets to stderr

func (l *loop) onText(s *sub, p []byte, now int64) {
	if dumpFrames > 0 {
		dumpFrames--
		fmt.Fprintf(os.Stderr, "frame: %s\n", p)
	}
	if !isEvent(p) {
		if i := valueAt(p, keyType); i >= 0 && bytes.HasPrefix(p[i:], []byte(`"error"`)) {
			l.errFrames++
			if len(l.errSamples) < 5 {
				l.errSamples = append(l.errSamples, string(p))
			}
		} else {
			l.otherFrames++
		}
		return
	}
	k := 0
	if s.nt > 1 {
		v, ok := stringAt(p, valueAt(p, keyTopic))
		if !ok {
			l.badFrames++
			return
		}
		if bytes.Equal(v, s.tname[1]) {
			k = 1
		} else if !bytes.Equal(v, s.tname[0]) {
			l.wrongTopic++
			return
		}
	}
	seq, ok := eventSeq(p)
	if !ok {
		l.badFrames++
		return
	}
	t := &s.tp[k]
	if t.count == 0 {
		t.first = seq
		t.last = seq
	} else if seq <= t.last {
		t.ooo++
	} else {
		if seq > t.last+1 {
			t.gaps += seq - t.last - 1
		}
		t.last = seq
	}
	t.count++
	l.total++
	if l.groupTotal != nil {
		l.groupTotal[s.group]++
	}
	if l.firstRecvNs == 0 {
		l.firstRecvNs = now
	}
	l.lastRecvNs = now
	s.seen++
	if l.sampleEvery <= 1 || (s.seen+int64(s.idx))%l.sampleEvery == 0 {
		if stamp, ok := eventStamp(p); ok {
			l.hist.add(now - stamp)
			if l.groupHist != nil {
				l.groupHist[s.group].add(now - stamp)
			}
		}
	}
}

// --- publisher ----------------------------------------------------------------

func (l *loop) attachPub(fd int, leftover []byte) error {
	l.pub = &pubConn{fd: fd, partial: leftover, nextReq: 1}
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLRDHUP, Fd: pubTag}
	return syscall.EpollCtl(l.ep, syscall.EPOLL_CTL_ADD, fd, &ev)
}

func (l *loop) servePub(events uint32) {
	p := l.pub
	if p == nil || p.fd < 0 {
		return
	}
	if events&syscall.EPOLLOUT != 0 {
		l.flushPub()
	}
	if events&(syscall.EPOLLIN|syscall.EPOLLRDHUP|syscall.EPOLLHUP|syscall.EPOLLERR) == 0 {
		return
	}
	buf := l.rbuf
	n0 := copy(buf, p.partial)
	p.partial = p.partial[:0]
	r, err := syscall.Read(p.fd, buf[n0:])
	if err != nil {
		if err == syscall.EAGAIN || err == syscall.EINTR {
			p.partial = append(p.partial, buf[:n0]...)
			return
		}
		l.readErrors["publisher: "+err.Error()]++
		l.closePub()
		return
	}
	if r == 0 {
		l.readErrors["publisher: closed by server"]++
		l.closePub()
		return
	}
	b := buf[:n0+r]
	for len(b) > 0 {
		op, _, payload, total, err := frameAt(b)
		if err != nil {
			l.readErrors["publisher: "+err.Error()]++
			l.closePub()
			return
		}
		if total == 0 {
			break
		}
		switch op {
		case opText:
			l.onReply(payload)
		case opPing:
			p.out = maskFrame(p.out, opPong, payload, maskKey())
			l.pongs++
			l.flushPub()
		case opClose:
			l.readErrors["publisher: close frame"]++
			l.closePub()
			return
		}
		b = b[total:]
	}
	if len(b) > 0 {
		p.partial = append(p.partial, b...)
	}
}

func (l *loop) closePub() {
	p := l.pub
	if p.fd >= 0 {
		_ = syscall.EpollCtl(l.ep, syscall.EPOLL_CTL_DEL, p.fd, nil)
		syscall.Close(p.fd)
		p.fd = -1
	}
}

type reply struct {
	Type    string          `json:"type"`
	Topic   string          `json:"topic"`
	Payload json.RawMessage `json:"payload"`
}

type replyPayload struct {
	Status string `json:"status"`
	Seq    *int64 `json:"seq"`
}

func (l *loop) onReply(b []byte) {
	p := l.pub
	if isEvent(b) {
		return // the publisher subscribes to nothing
	}
	var r reply
	if err := json.Unmarshal(b, &r); err != nil {
		l.badFrames++
		return
	}
	if r.Type == "pong" {
		return
	}
	p.inflight--
	if r.Type == "response" {
		var rp replyPayload
		if json.Unmarshal(r.Payload, &rp) == nil && rp.Status == "published" && rp.Seq != nil {
			p.acked++
			ti, ok := l.topicByNm[r.Topic]
			if !ok {
				l.wrongTopic++
				return
			}
			tp := l.topics[ti]
			seq := *rp.Seq
			if tp.acked == 0 || seq < tp.first {
				tp.first = seq
			}
			if tp.acked == 0 || seq > tp.last {
				tp.last = seq
			}
			tp.acked++
			return
		}
	}
	p.errors++
	if len(p.errSamples) < 5 {
		p.errSamples = append(p.errSamples, string(b))
	}
}

func (l *loop) appendPublish(ti int, stamp int64) {
	p := l.pub
	tp := l.topics[ti]
	tp.sent++
	s := p.scratch[:0]
	s = append(s, `{"type":"publish","topic":"`...)
	s = append(s, tp.name...)
	s = append(s, `","payload":{"t":`...)
	s = appendInt(s, stamp)
	s = append(s, `,"pad":"`...)
	s = append(s, l.pl.pad...)
	s = append(s, `"},"requestId":`...)
	s = appendInt(s, p.nextReq)
	s = append(s, '}')
	p.scratch = s
	p.out = maskFrame(p.out, opText, s, maskKey())
	p.nextReq++
	p.sent++
	p.inflight++
	if p.firstSendNs == 0 {
		p.firstSendNs = stamp
	}
	p.lastSendNs = stamp
}

func appendInt(b []byte, v int64) []byte {
	var tmp [20]byte
	i := len(tmp)
	neg := v < 0
	if neg {
		v = -v
	}
	for {
		i--
		tmp[i] = byte('0' + v%10)
		v /= 10
		if v == 0 {
			break
		}
	}
	if neg {
		i--
		tmp[i] = '-'
	}
	return append(b, tmp[i:]...)
}

func (l *loop) flushPub() {
	p := l.pub
	for len(p.out) > 0 && p.fd >= 0 {
		n, err := syscall.Write(p.fd, p.out)
		if err != nil {
			if err == syscall.EAGAIN || err == syscall.EINTR {
				break
			}
			l.readErrors["publisher write: "+err.Error()]++
			l.closePub()
			return
		}
		p.out = p.out[n:]
	}
	want := len(p.out) > 0
	if want != p.wantOut && p.fd >= 0 {
		ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLRDHUP, Fd: pubTag}
		if want {
			ev.Events |= syscall.EPOLLOUT
		}
		_ = syscall.EpollCtl(l.ep, syscall.EPOLL_CTL_MOD, p.fd, &ev)
		p.wantOut = want
	}
	if !want {
		p.out = p.out[:0]
	}
}

// --- phases -------------------------------------------------------------------

func (l *loop) begin(p *plan) {
	l.pl = p
	l.sampleEvery = p.sampleEvery
	now := nowNs()
	l.snapStart = takeSnapshot(l.serverPid)
	l.rssPeak = rssBytes(l.serverPid)
	l.nextRssNs = now + int64(250*time.Millisecond)
	l.startNs = now
	l.endNs = now + int64(p.duration)
	for _, s := range p.streams {
		s.nextDue = now
	}
	// reset receive counters: everything before this phase is not counted
	l.total, l.firstRecvNs, l.lastRecvNs = 0, 0, 0
	l.reads, l.epollWaits, l.pauses, l.wireBytes = 0, 0, 0, 0
	l.winStart, l.winEvents, l.hot = now, 0, false
	l.hist = newHist()
	if l.groups > 1 {
		l.groupHist = make([]*hist, l.groups)
		for g := range l.groupHist {
			l.groupHist[g] = newHist()
		}
		l.groupTotal = make([]int64, l.groups)
	}
	for _, s := range l.subs {
		s.tp = [2]topicRecv{}
		s.seen = 0
	}
	l.state = stPublishing
}

// step sends what is due, moves the phase along, and returns how long the
// loop may wait for I/O (ns).
func (l *loop) step(now int64) int64 {
	wait := int64(50 * time.Millisecond)
	if now >= l.nextRssNs {
		if r := rssBytes(l.serverPid); r > l.rssPeak {
			l.rssPeak = r
		}
		l.nextRssNs = now + int64(250*time.Millisecond)
	}
	p := l.pub
	switch l.state {
	case stPublishing:
		if now >= l.endNs || p.fd < 0 {
			l.flushPub()
			l.snapPubEnd = takeSnapshot(l.serverPid)
			l.state = stDraining
			l.drainStartNs = now
			l.lastProgress = now
			l.lastTotal = -1
			l.phaseTimeout = now + int64(l.pl.drainTimeout)
			return 0
		}
		if l.pl.mode == "max" {
			stamp := nowNs()
			for p.inflight < l.pl.inflight {
				l.appendPublish(0, stamp)
			}
		} else {
			stamp := nowNs()
			for _, s := range l.pl.streams {
				for s.nextDue <= now && s.nextDue < l.endNs {
					lag := stamp - s.nextDue
					if lag > p.maxLagNs {
						p.maxLagNs = lag
					}
					if lag > int64(time.Millisecond) {
						p.lagged++
					}
					p.sumLagNs += float64(lag)
					l.appendPublish(s.topicOf(s.sent), stamp)
					s.sent++
					s.nextDue += s.interval
				}
				if d := s.nextDue - now; d < wait {
					wait = d
				}
			}
		}
		l.flushPub()
		if d := l.endNs - now; d < wait {
			wait = d
		}
		return wait
	case stDraining:
		// Ends when every publish is answered and every subscriber has every
		// acknowledged event; or when nothing (event or answer) arrived for
		// `settle`; or `drainTimeout` after publishing stopped.
		progress := l.total + p.acked + p.errors
		how := ""
		if p.inflight <= 0 && l.total >= l.expectedFromAcks() {
			how = "complete"
		} else if progress != l.lastTotal {
			l.lastTotal = progress
			l.lastProgress = now
		} else if now-l.lastProgress >= int64(l.pl.settle) {
			how = "settled"
		}
		if how == "" && now >= l.phaseTimeout {
			how = "timeout"
		}
		if how != "" {
			l.drainHow = how
			l.finish(now)
			return int64(50 * time.Millisecond)
		}
		return int64(20 * time.Millisecond)
	}
	return wait
}

func (l *loop) finish(now int64) {
	end := takeSnapshot(l.serverPid)
	p := l.pub
	// Each topic's sequenced range: what the server acknowledged, widened by
	// what any subscriber received (a server may drop the publisher's own
	// answers on a full queue, as it drops events).
	type rng struct{ lo, hi int64 }
	ranges := make([]rng, len(l.topics))
	for i, tp := range l.topics {
		ranges[i] = rng{1 << 62, -1}
		if tp.acked > 0 {
			ranges[i] = rng{tp.first, tp.last}
		}
	}
	for _, s := range l.subs {
		for k := 0; k < s.nt; k++ {
			t := &s.tp[k]
			if t.count == 0 {
				continue
			}
			r := &ranges[s.tidx[k]]
			if t.first < r.lo {
				r.lo = t.first
			}
			if t.last > r.hi {
				r.hi = t.last
			}
		}
	}
	var sequenced, offered int64
	for i, tp := range l.topics {
		if ranges[i].hi >= ranges[i].lo {
			sequenced += ranges[i].hi - ranges[i].lo + 1
		}
		offered += tp.sent * tp.subscribers
	}
	var expected, drops, dropsStart, dropsEnd, dropsStream, ooo int64
	subsComplete, subsEmpty := 0, 0
	for _, s := range l.subs {
		complete := true
		for k := 0; k < s.nt; k++ {
			r := ranges[s.tidx[k]]
			t := &s.tp[k]
			ooo += t.ooo
			if r.hi < r.lo {
				continue
			}
			want := r.hi - r.lo + 1
			expected += want
			if t.count == 0 {
				drops += want
				dropsEnd += want
				complete = false
				if k == 0 {
					subsEmpty++
				}
				continue
			}
			got := t.count - t.ooo
			if d := want - got; d > 0 {
				drops += d
				complete = false
			}
			dropsStart += t.first - r.lo
			dropsEnd += r.hi - t.last
			dropsStream += t.gaps
		}
		if complete && !s.closed {
			subsComplete++
		}
	}
	l.expected = expected
	pubSeconds := float64(l.snapPubEnd.at.Sub(l.snapStart.at).Seconds())
	window := float64(l.lastRecvNs-p.firstSendNs) / 1e9
	res := map[string]any{
		"mode":                     l.pl.mode,
		"publish_seconds":          round(pubSeconds, 3),
		"published":                p.sent,
		"acked":                    p.acked,
		"publish_errors":           p.errors,
		"publish_unanswered":       p.inflight,
		"publish_rate":             round(float64(p.acked)/pubSeconds, 1),
		"deliveries":               l.total,
		"expected_deliveries":      l.expected,
		"delivery_window_seconds":  round(window, 3),
		"drain":                    l.drainHow,
		"drain_seconds":            round(float64(now-l.drainStartNs)/1e9, 3),
		"drops":                    drops,
		"drops_in_stream":          dropsStream,
		"drops_at_start":           dropsStart,
		"drops_at_end":             dropsEnd,
		"out_of_order":             ooo,
		"sequenced":                sequenced,
		"offered_deliveries":       offered,
		"subscribers_complete":     subsComplete,
		"subscribers_with_nothing": subsEmpty,
		"latency":                  l.hist.summary(),
		"cpu_publishing":           cpuBetween(l.snapStart, l.snapPubEnd),
		"cpu_total":                cpuBetween(l.snapStart, end),
		"server_rss_peak_bytes":    l.rssPeak,
		"server_rss_end_bytes":     rssBytes(l.serverPid),
	}
	if l.groupHist != nil {
		// per -sub-urls entry: its subscribers' deliveries and latency
		byURL := make([]map[string]any, l.groups)
		for g := range byURL {
			n := 0
			for _, s := range l.subs {
				if s.group == g {
					n++
				}
			}
			entry := map[string]any{"subscribers": n, "deliveries": l.groupTotal[g], "latency": l.groupHist[g].summary()}
			if window > 0 {
				entry["deliveries_per_second"] = round(float64(l.groupTotal[g])/window, 1)
			}
			byURL[g] = entry
		}
		res["by_sub_url"] = byURL
	}
	res["loadgen_reads"] = l.reads
	res["wire_bytes"] = l.wireBytes
	if l.total > 0 {
		res["wire_bytes_per_delivery"] = round(float64(l.wireBytes)/float64(l.total), 1)
	}
	if l.inflater != nil {
		res["inflated_frames"] = l.inflater.frames
		res["inflate_cache_hits"] = l.inflater.hits
	}
	res["loadgen_epoll_waits"] = l.epollWaits
	res["loadgen_coalescing_pauses"] = l.pauses
	if l.reads > 0 {
		res["events_per_read"] = round(float64(l.total)/float64(l.reads), 2)
	}
	if window > 0 {
		res["deliveries_per_second"] = round(float64(l.total)/window, 1)
	}
	if l.expected > 0 {
		// of the events the server sequenced, the share each subscriber got
		res["delivered_fraction"] = round(float64(l.total-ooo)/float64(l.expected), 5)
	}
	if offered > 0 {
		// of the events offered, the share delivered before the run ended
		res["offered_delivered_fraction"] = round(float64(l.total-ooo)/float64(offered), 5)
	}
	res["publish_answers_missing"] = p.sent - p.acked - p.errors
	if l.pl.mode == "rate" && p.sent > 0 {
		res["publish_lag"] = map[string]any{
			"max_ms":        round(float64(p.maxLagNs)/1e6, 3),
			"mean_ms":       round(p.sumLagNs/float64(p.sent)/1e6, 3),
			"late_over_1ms": p.lagged,
		}
	}
	if len(p.errSamples) > 0 {
		res["publish_error_samples"] = p.errSamples
	}
	topics := 0
	for _, tp := range l.topics {
		if tp.acked > 0 {
			topics++
		}
	}
	res["topics_published"] = topics
	l.state = stIdle
	l.pl = nil
	l.result <- res
}

func (l *loop) counters() map[string]any {
	return map[string]any{
		"disconnects":         l.disconnects,
		"pongs_sent":          l.pongs,
		"pong_write_failures": l.pongFails,
		"other_frames":        l.otherFrames,
		"bad_frames":          l.badFrames,
		"wrong_topic":         l.wrongTopic,
		"error_frames":        l.errFrames,
		"error_samples":       l.errSamples,
		"frame_errors":        l.frameErrors,
		"read_errors":         l.readErrors,
		"epoll_pwait2":        havePwait2,
	}
}

func (l *loop) shutdown() {
	atomic.StoreInt32(&l.stop, 1)
	select {
	case <-l.done:
	case <-time.After(5 * time.Second):
		fmt.Println(`{"error":"event loop did not stop"}`)
	}
}
