module tidings/bench/loadgen

go 1.19
