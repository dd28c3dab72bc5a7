//! `TcpComm` between threads of this test over 127.0.0.1 sockets: every collective gives what
//! the thread group (`local_group`) gives, bit for bit, in every dtype on the wire; a rank that
//! drops, stalls or calls another collective makes the others fail naming it, within the
//! timeout, never hanging.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use lockstep_dist::tcp::TcpComm;
use lockstep_dist::{local_group, Collective, CollectiveError};

/// A TCP group of `world` ranks in this process.
fn tcp_group(world: usize, timeout: Duration) -> Vec<TcpComm> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let peers: Vec<_> = (1..world).map(|r| std::thread::spawn(move || TcpComm::connect("127.0.0.1", port, r, world, timeout).unwrap())).collect();
    let mut all = vec![TcpComm::hub(listener, world, timeout).unwrap()];
    all.extend(peers.into_iter().map(|p| p.join().unwrap()));
    all
}

/// `f` on every rank at once; the results in rank order.
fn each<C: Collective, T: Send>(comms: &[C], f: impl Fn(&C) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let hs: Vec<_> = comms.iter().map(|c| s.spawn(|| f(c))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// A tensor's values (exact in f64 for every dtype used here) with its shape and dtype.
fn values(t: &Tensor) -> (Vec<usize>, DType, Vec<f64>) {
    (t.dims().to_vec(), t.dtype(), t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap())
}

/// Everything a rank computes over its group: sums, all-to-alls (uneven, with empty blocks),
/// count exchanges, host and row gathers, in several dtypes.
fn workload<C: Collective>(c: &C) -> Vec<String> {
    let (r, w) = (c.rank(), c.world_size());
    let dev = Device::Cpu;
    let mut out = Vec::new();
    for dt in [DType::F32, DType::BF16, DType::F16, DType::F64, DType::U32, DType::I64, DType::U8] {
        let base = Tensor::arange(0f32, 12.0, &dev).unwrap().reshape((3, 4)).unwrap();
        // values that round differently depending on the order they are added in (floats)
        let x = ((base * (0.37 + r as f64 * 1.13)).unwrap() + 0.1).unwrap();
        let x = if dt.is_int() { x.abs().unwrap().round().unwrap() } else { x };
        let x = x.to_dtype(dt).unwrap();
        out.push(format!("sum {dt:?} {:?}", values(&c.all_reduce_sum(&x).unwrap())));
        let send_rows: Vec<usize> = (0..w).map(|d| (r + d) % 3).collect();
        let recv_rows: Vec<usize> = (0..w).map(|from| (from + r) % 3).collect();
        let n: usize = send_rows.iter().sum();
        let send = Tensor::arange(0u32, (n * 2) as u32, &dev).unwrap().to_dtype(DType::F32).unwrap();
        let send = ((send + (100 * r) as f64).unwrap()).reshape((n, 2)).unwrap().to_dtype(dt).unwrap();
        out.push(format!("a2a {dt:?} {:?}", values(&c.all_to_all_rows(&send, &send_rows, &recv_rows).unwrap())));
        out.push(format!("rows {dt:?} {:?}", values(&c.all_gather_rows(&x).unwrap())));
    }
    // a 3-d tensor and a scalar
    let t3 = Tensor::arange(0f32, 24.0, &dev).unwrap().reshape((2, 3, 4)).unwrap();
    out.push(format!("sum 3d {:?}", values(&c.all_reduce_sum(&(t3 * (r as f64 + 0.3)).unwrap()).unwrap())));
    out.push(format!("sum scalar {:?}", values(&c.all_reduce_sum(&Tensor::new(1.5f32 + r as f32, &dev).unwrap()).unwrap())));
    let counts: Vec<usize> = (0..w * 2).map(|i| i * 10 + r).collect();
    out.push(format!("counts {:?}", c.exchange_counts(&counts).unwrap()));
    let host: Vec<f64> = (0..=r).map(|i| i as f64 * 0.1 - r as f64 + if i == 1 { f64::INFINITY } else { -0.0 }).collect();
    let got = c.all_gather_host(&host).unwrap();
    out.push(format!("host {:?}", got.iter().map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()).collect::<Vec<_>>()));
    out.push(format!("host empty {:?}", c.all_gather_host(&[]).unwrap()));
    out
}

#[test]
fn four_tcp_ranks_equal_four_thread_ranks() {
    let t0 = Instant::now();
    let tcp = each(&tcp_group(4, Duration::from_secs(20)), workload);
    let local = each(&local_group(4), workload);
    assert_eq!(tcp.len(), 4);
    for (r, (a, b)) in tcp.iter().zip(&local).enumerate() {
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x, y, "rank {r}");
        }
        assert_eq!(a.len(), b.len());
    }
    // the sums are the same on every rank
    assert_eq!(tcp[0].iter().filter(|l| l.starts_with("sum")).collect::<Vec<_>>(), tcp[3].iter().filter(|l| l.starts_with("sum")).collect::<Vec<_>>());
    // one rank is a group too
    assert_eq!(each(&tcp_group(1, Duration::from_secs(5)), workload), each(&local_group(1), workload));
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
}

fn abort_of(e: &CollectiveError) -> (usize, String) {
    match e {
        CollectiveError::Aborted { rank, cause } => (*rank, cause.clone()),
        other => panic!("not an abort: {other:?}"),
    }
}

#[test]
fn a_rank_that_drops_makes_the_others_fail_naming_it() {
    let t = Duration::from_secs(20);
    let t0 = Instant::now();
    // rank 2 goes away (its process exited: its sockets close)
    let mut g = tcp_group(3, t);
    drop(g.pop());
    let errs = each(&g, |c| c.all_gather_host(&[1.0]).unwrap_err());
    for e in &errs {
        let (rank, cause) = abort_of(e);
        assert_eq!(rank, 2, "{e}");
        assert!(cause.contains("rank 2 disconnected"), "{cause}");
    }
    // and the group stays failed
    assert_eq!(abort_of(&g[1].all_reduce_sum(&Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap()).unwrap_err()).0, 2);
    // rank 0 goes away
    let mut g = tcp_group(3, t);
    drop(g.remove(0));
    for e in each(&g, |c| c.exchange_counts(&[1, 2, 3]).unwrap_err()) {
        let (rank, cause) = abort_of(&e);
        assert_eq!(rank, 0, "{e}");
        assert!(cause.contains("rank 0 (127.0.0.1:") && cause.contains("disconnected"), "{cause}");
    }
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}

#[test]
fn a_stalled_or_diverging_rank_is_named_within_the_timeout() {
    // rank 2 is alive but never calls: the others fail after the timeout, naming it
    let g = tcp_group(3, Duration::from_millis(500));
    let t0 = Instant::now();
    let errs = each(&g[..2], |c| c.all_gather_host(&[1.0]).unwrap_err());
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    for e in &errs {
        let (rank, cause) = abort_of(e);
        assert_eq!(rank, 2, "{e}");
        assert!(cause.contains("rank 2 sent nothing to rank 0 within 0.5 s"), "{cause}");
    }
    // rank 1 calls another collective than the others: every rank fails naming it
    let g = tcp_group(3, Duration::from_secs(20));
    let errs = each(&g, |c| {
        if c.rank() == 1 {
            c.exchange_counts(&[0, 0, 0]).unwrap_err()
        } else {
            c.all_gather_host(&[2.0]).unwrap_err()
        }
    });
    for e in &errs {
        let (rank, cause) = abort_of(e);
        assert_eq!(rank, 1, "{e}");
        assert!(cause.contains("the ranks' collectives differ"), "{cause}");
    }
    // shapes that do not add up: named too
    let g = tcp_group(2, Duration::from_secs(20));
    let errs = each(&g, |c| c.all_reduce_sum(&Tensor::zeros(c.rank() + 1, DType::F32, &Device::Cpu).unwrap()).unwrap_err());
    for e in &errs {
        assert_eq!(abort_of(e).0, 1, "{e}");
    }
    // a rank that joins a group of another size is not let in; the hub says who is missing
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let stray = std::thread::spawn(move || TcpComm::connect("127.0.0.1", port, 1, 3, Duration::from_millis(800)));
    let e = TcpComm::hub(listener, 2, Duration::from_millis(500)).unwrap_err();
    assert!(e.to_string().contains("ranks [1] of 2 did not join the TCP group at 127.0.0.1:"), "{e}");
    assert!(stray.join().unwrap().is_err());
}
