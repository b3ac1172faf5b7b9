package main

import (
	"math"
	"math/bits"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// --- latency histogram --------------------------------------------------------

// hist is a log-linear histogram of nanosecond values: 128 sub-buckets per
// power of two, so a reported percentile is within 0.8% of the true sample.
type hist struct {
	counts []uint64
	n      uint64
	sum    float64
	min    int64
	max    int64
	neg    uint64 // negative samples (clock went backwards): counted, not binned
}

const subBits = 7

func newHist() *hist {
	return &hist{counts: make([]uint64, (64-subBits+1)<<subBits), min: math.MaxInt64}
}

func bucketOf(v uint64) int {
	if v < 1<<subBits {
		return int(v)
	}
	e := bits.Len64(v) - subBits - 1
	return (e+1)<<subBits + int((v>>uint(e))&(1<<subBits-1))
}

// bucketMid is a representative value (midpoint) of bucket b.
func bucketMid(b int) float64 {
	if b < 1<<subBits {
		return float64(b)
	}
	e := b>>subBits - 1
	m := uint64(b&(1<<subBits-1)) | 1<<subBits
	lo := m << uint(e)
	return float64(lo) + float64(uint64(1)<<uint(e))/2
}

func (h *hist) add(v int64) {
	if v < 0 {
		h.neg++
		return
	}
	h.counts[bucketOf(uint64(v))]++
	h.n++
	h.sum += float64(v)
	if v < h.min {
		h.min = v
	}
	if v > h.max {
		h.max = v
	}
}

func (h *hist) quantile(q float64) float64 {
	if h.n == 0 {
		return math.NaN()
	}
	rank := uint64(math.Ceil(q * float64(h.n)))
	if rank < 1 {
		rank = 1
	}
	var acc uint64
	for b, c := range h.counts {
		acc += c
		if acc >= rank {
			v := bucketMid(b)
			if v > float64(h.max) {
				v = float64(h.max)
			}
			if v < float64(h.min) {
				v = float64(h.min)
			}
			return v
		}
	}
	return float64(h.max)
}

func ms(v float64) any {
	if math.IsNaN(v) {
		return nil
	}
	return math.Round(v/1e3) / 1e3
}

// summary in milliseconds.
func (h *hist) summary() map[string]any {
	out := map[string]any{"samples": h.n, "negative_samples": h.neg}
	if h.n == 0 {
		return out
	}
	out["p50_ms"] = ms(h.quantile(0.50))
	out["p90_ms"] = ms(h.quantile(0.90))
	out["p99_ms"] = ms(h.quantile(0.99))
	out["p999_ms"] = ms(h.quantile(0.999))
	out["max_ms"] = ms(float64(h.max))
	out["min_ms"] = ms(float64(h.min))
	out["mean_ms"] = ms(h.sum / float64(h.n))
	// a coarse distribution for plots: value at each of these percentiles
	pcts := []float64{1, 5, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 99.99, 100}
	dist := make([][2]any, 0, len(pcts))
	for _, p := range pcts {
		v := h.quantile(p / 100)
		if p == 100 {
			v = float64(h.max)
		}
		dist = append(dist, [2]any{p, ms(v)})
	}
	out["percentiles_ms"] = dist
	return out
}

// --- clock ----------------------------------------------------------------------

// The stamp in each published payload is "unix nanoseconds" computed from the
// monotonic clock anchored once at start, so wall-clock steps cannot make a
// latency negative. Publisher and subscribers live in this one process.
var (
	clockBase     = time.Now()
	clockBaseUnix = clockBase.UnixNano()
)

func nowNs() int64 { return clockBaseUnix + int64(time.Since(clockBase)) }

// --- CPU and memory readings ----------------------------------------------------

const clkTck = 100 // USER_HZ on Linux

type cpuTimes struct {
	User, Sys float64 // seconds
	ok        bool
}

func selfCPU() cpuTimes {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return cpuTimes{}
	}
	return cpuTimes{
		User: float64(ru.Utime.Sec) + float64(ru.Utime.Usec)/1e6,
		Sys:  float64(ru.Stime.Sec) + float64(ru.Stime.Usec)/1e6,
		ok:   true,
	}
}

func procCPU(pid int) cpuTimes {
	if pid <= 0 {
		return cpuTimes{}
	}
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return cpuTimes{}
	}
	s := string(data)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return cpuTimes{}
	}
	f := strings.Fields(s[i+1:])
	// after ")": state(3) ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime(14) stime(15)
	if len(f) < 13 {
		return cpuTimes{}
	}
	u, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return cpuTimes{User: u / clkTck, Sys: st / clkTck, ok: true}
}

// rssBytes reads VmRSS from /proc/PID/status.
func rssBytes(pid int) int64 {
	if pid <= 0 {
		return -1
	}
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			f := strings.Fields(line)
			if len(f) >= 2 {
				kb, _ := strconv.ParseInt(f[1], 10, 64)
				return kb * 1024
			}
		}
	}
	return -1
}

// coreTimes reads per-CPU busy and total jiffies from /proc/stat.
type coreTimes struct{ busy, total []float64 }

func readCores() coreTimes {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return coreTimes{}
	}
	var ct coreTimes
	for _, line := range strings.Split(string(data), "\n") {
		if !strings.HasPrefix(line, "cpu") || strings.HasPrefix(line, "cpu ") {
			continue
		}
		f := strings.Fields(line)
		var total, idle float64
		for k, x := range f[1:] {
			v, _ := strconv.ParseFloat(x, 64)
			if k == 8 || k == 9 { // guest, guest_nice are already in user/nice
				continue
			}
			total += v
			if k == 3 || k == 4 { // idle, iowait
				idle += v
			}
		}
		ct.busy = append(ct.busy, total-idle)
		ct.total = append(ct.total, total)
	}
	return ct
}

// snapshot of everything measured at a phase boundary.
type snapshot struct {
	at      time.Time
	self    cpuTimes
	server  cpuTimes
	cores   coreTimes
	watched []cpuTimes // of watchedPids, in order
}

// watchedPids are the -watch-pids: other processes whose CPU each phase reports.
var watchedPids []int

func takeSnapshot(serverPid int) snapshot {
	s := snapshot{at: time.Now(), self: selfCPU(), server: procCPU(serverPid), cores: readCores()}
	for _, pid := range watchedPids {
		s.watched = append(s.watched, procCPU(pid))
	}
	return s
}

func round(v float64, digits int) float64 {
	p := math.Pow(10, float64(digits))
	return math.Round(v*p) / p
}

// cpuBetween reports CPU use between two snapshots, in percent of one CPU.
func cpuBetween(a, b snapshot) map[string]any {
	wall := b.at.Sub(a.at).Seconds()
	out := map[string]any{"wall_seconds": round(wall, 3)}
	if wall <= 0 {
		return out
	}
	pct := func(x float64) float64 { return round(100*x/wall, 1) }
	if a.self.ok && b.self.ok {
		u, s := b.self.User-a.self.User, b.self.Sys-a.self.Sys
		out["loadgen_cpu_percent"] = pct(u + s)
		out["loadgen_cpu_user_percent"] = pct(u)
		out["loadgen_cpu_system_percent"] = pct(s)
		out["loadgen_cpu_seconds"] = round(u+s, 3)
	}
	if a.server.ok && b.server.ok {
		u, s := b.server.User-a.server.User, b.server.Sys-a.server.Sys
		out["server_cpu_percent"] = pct(u + s)
		out["server_cpu_user_percent"] = pct(u)
		out["server_cpu_system_percent"] = pct(s)
		out["server_cpu_seconds"] = round(u+s, 3)
	}
	var watchedSum float64
	if len(a.watched) > 0 && len(a.watched) == len(b.watched) {
		w := map[string]any{}
		for i, pid := range watchedPids {
			if a.watched[i].ok && b.watched[i].ok {
				d := b.watched[i].User - a.watched[i].User + b.watched[i].Sys - a.watched[i].Sys
				w[strconv.Itoa(pid)] = pct(d)
				watchedSum += pct(d)
			}
		}
		out["watched_cpu_percent"] = w
	}
	if len(a.cores.busy) == len(b.cores.busy) && len(a.cores.busy) > 0 {
		busy := make([]float64, len(a.cores.busy))
		for i := range busy {
			dt := b.cores.total[i] - a.cores.total[i]
			if dt > 0 {
				busy[i] = round(100*(b.cores.busy[i]-a.cores.busy[i])/dt, 1)
			}
		}
		out["core_busy_percent"] = busy
		// CPU used meanwhile by everything else (other processes, and kernel
		// work charged to no process), in percent of one CPU
		others := 0.0
		for _, x := range busy {
			others += x
		}
		if v, ok := out["server_cpu_percent"].(float64); ok {
			others -= v
		}
		if v, ok := out["loadgen_cpu_percent"].(float64); ok {
			others -= v
		}
		others -= watchedSum
		if others < 0 {
			others = 0
		}
		out["others_cpu_percent"] = round(others, 1)
	}
	return out
}
