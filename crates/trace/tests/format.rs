//! `.lstrace` file format: bitwise round trips and named errors on corrupt input.

mod common;
use common::{make, make_variable, Spec};
use lockstep_trace::{
    decode_block, encode_block, encode_file, scan_blocks, DecodeLimits, IdCodec, ProbDtype, Reader, TraceError,
    TraceMeta, Writer,
};

fn rt(t: &lockstep_trace::RouteTrace) {
    let b = encode_block(t);
    let (back, used) = decode_block(&b, "b", DecodeLimits::default()).expect("decodes");
    assert_eq!(used, b.len());
    assert!(back.bits_eq(t), "round trip differs");
}

#[test]
fn block_round_trips_every_codec_and_dtype() {
    for ordered in [true, false] {
        for probs in [None, Some(ProbDtype::F32), Some(ProbDtype::Bf16), Some(ProbDtype::F16)] {
            for missing in [vec![], vec![8], vec![0, 4, 8]] {
                rt(&make(&Spec { ordered, probs, missing: missing.clone(), ..Spec::default() }));
            }
        }
    }
    // 48 x top-8 of 128, both orders
    for ordered in [true, false] {
        let t = make(&Spec { tokens: 40, layers: (0..48).collect(), k: 8, e: 128, ordered, ..Spec::default() });
        assert_eq!(IdCodec::choose(t.meta()), if ordered { IdCodec::Ordered } else { IdCodec::Subset });
        rt(&t);
    }
    // plain: C(65535, 8) overflows u64
    let t = make(&Spec { e: 65535, k: 8, ..Spec::default() });
    assert_eq!(IdCodec::choose(t.meta()), IdCodec::Plain);
    rt(&t);
    // wide expert counts (guess tables need several correction steps)
    for ordered in [true, false] {
        rt(&make(&Spec { e: 65535, k: 2, ordered, ..Spec::default() }));
        rt(&make(&Spec { e: 1000, k: 4, ordered, probs: Some(ProbDtype::F16), ..Spec::default() }));
        rt(&make(&Spec { e: 64, k: 16, ordered, missing: vec![1], ..Spec::default() }));
    }
    // edge shapes: k = E, k = 1, E = 1, no layers, no tokens
    rt(&make(&Spec { e: 4, k: 4, ..Spec::default() }));
    rt(&make(&Spec { e: 300, k: 1, ..Spec::default() }));
    rt(&make(&Spec { e: 1, k: 1, ..Spec::default() }));
    rt(&make(&Spec { layers: vec![], ..Spec::default() }));
    rt(&make(&Spec { tokens: 0, ..Spec::default() }));
    // variable rows (expert choice)
    rt(&make_variable(11, 3, 64, 5, &[]));
    rt(&make_variable(11, 3, 64, 6, &[2, 10]));
}

#[test]
fn unordered_rows_are_canonical_sets() {
    let o = make(&Spec { ordered: true, probs: Some(ProbDtype::F32), ..Spec::default() });
    let mut m = o.meta().clone();
    m.ordered = false;
    let u = lockstep_trace::RouteTrace::new(
        m,
        o.layers().to_vec(),
        o.num_tokens(),
        o.ids().to_vec(),
        o.missing().to_vec(),
        o.probs().cloned(),
    )
    .unwrap();
    for t in 0..u.num_tokens() {
        for l in 0..u.num_layers() {
            let (a, b) = (o.row(t, l).unwrap(), u.row(t, l).unwrap());
            assert!(b.windows(2).all(|w| w[0] < w[1]));
            let mut s = a.to_vec();
            s.sort();
            assert_eq!(s, b);
            // probabilities travel with their expert
            let (pa, pb) = (o.row_probs(t, l).unwrap(), u.row_probs(t, l).unwrap());
            for (j, id) in b.iter().enumerate() {
                let src = a.iter().position(|x| x == id).unwrap();
                assert_eq!(pa[src].to_bits(), pb[j].to_bits());
            }
        }
    }
    rt(&u);
}

#[test]
fn file_write_index_mmap_append_and_scan() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.lstrace");
    let traces: Vec<_> = (0..5)
        .map(|i| make(&Spec { seed: i + 10, tokens: 5 + i as usize, missing: vec![0], ..Spec::default() }))
        .collect();
    let mut w = Writer::create(&path).unwrap();
    for t in &traces[..3] {
        w.push(t).unwrap();
    }
    w.finish().unwrap();
    let r = Reader::open(&path).unwrap();
    assert_eq!(r.len(), 3);
    assert!(r.get(2).unwrap().bits_eq(&traces[2]));
    drop(r);
    let mut w = Writer::append(&path).unwrap();
    assert_eq!(w.len(), 3);
    for t in &traces[3..] {
        w.push(t).unwrap();
    }
    w.finish().unwrap();
    let r = Reader::open(&path).unwrap();
    assert_eq!(r.len(), 5);
    for (i, t) in traces.iter().enumerate() {
        assert!(r.get(i).unwrap().bits_eq(t), "sequence {i}");
    }
    assert_eq!(r.total_tokens(), traces.iter().map(|t| t.num_tokens() as u64).sum::<u64>());
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes, encode_file(&traces), "append == one-shot write");
    // an unfinished file: blocks are still recoverable by scanning
    let idx = r.entries()[4].offset + r.entries()[4].len;
    let (seqs, err) = scan_blocks(&bytes[..idx as usize], DecodeLimits::default());
    assert!(err.is_none());
    assert_eq!(seqs.len(), 5);
    assert!(matches!(Reader::from_bytes(bytes[..idx as usize].to_vec()), Err(TraceError::BadMagic { .. })));
    // appending to an unfinished file with a torn last block recovers the whole blocks
    let torn = dir.path().join("torn.lstrace");
    std::fs::write(&torn, &bytes[..idx as usize - 7]).unwrap();
    let mut w = Writer::append(&torn).unwrap();
    assert_eq!(w.len(), 4);
    w.push(&traces[4]).unwrap();
    w.finish().unwrap();
    assert_eq!(std::fs::read(&torn).unwrap(), bytes);
    if let Ok(dir) = std::env::var("LSTRACE_FUZZ_SEEDS") {
        let small = make(&Spec { tokens: 3, ordered: false, probs: Some(ProbDtype::Bf16), ..Spec::default() });
        std::fs::write(
            format!("{dir}/small.lstrace"),
            [&[0u8][..], &encode_file(std::slice::from_ref(&small))].concat(),
        )
        .unwrap();
        std::fs::write(format!("{dir}/five.lstrace"), [&[0u8][..], &bytes].concat()).unwrap();
        let var = make_variable(6, 2, 9, 1, &[3]);
        std::fs::write(
            format!("{dir}/variable.lstrace"),
            [&[0u8][..], &encode_file(std::slice::from_ref(&var))].concat(),
        )
        .unwrap();
        // block bodies (mode 1): every codec and probability dtype
        let bodies = [
            small,
            var,
            make(&Spec { ordered: true, probs: Some(ProbDtype::F16), missing: vec![2], ..Spec::default() }),
            make(&Spec { ordered: false, e: 128, k: 8, layers: vec![0, 1], ..Spec::default() }),
            make(&Spec { e: 65535, k: 8, probs: Some(ProbDtype::F32), ..Spec::default() }),
        ];
        for (i, t) in bodies.iter().enumerate() {
            let b = encode_block(t);
            std::fs::write(format!("{dir}/body{i}.bin"), [&[1u8][..], &b[12..b.len() - 4]].concat()).unwrap();
            std::fs::write(format!("{dir}/block{i}.bin"), [&[2u8][..], &b].concat()).unwrap();
        }
    }
}

#[test]
fn every_truncation_is_a_named_error() {
    let f = encode_file(&[make(&Spec::default()), make_variable(4, 2, 8, 3, &[1])]);
    for n in 0..f.len() {
        let e = match Reader::from_bytes(f[..n].to_vec()) {
            Err(e) => e,
            Ok(r) => r.iter().find_map(|x| x.err()).expect("truncated file must fail"),
        };
        assert!(!e.field().is_empty(), "{e}");
        let (_, err) = scan_blocks(&f[..n], DecodeLimits::default());
        let _ = err; // scanning a prefix may stop early or cleanly, never panic
    }
}

#[test]
fn wrong_magic_version_and_checksum() {
    let f = encode_file(&[make(&Spec::default())]);
    let mut bad = f.clone();
    bad[0] = b'X';
    let e = Reader::from_bytes(bad).err().unwrap();
    assert!(matches!(&e, TraceError::BadMagic { field, .. } if field == "header.magic"), "{e}");
    let mut bad = f.clone();
    bad[8] = 9;
    assert!(matches!(Reader::from_bytes(bad).err().unwrap(), TraceError::Version { .. }));
    // flip one payload bit of the block
    let mut bad = f.clone();
    bad[16 + 12 + 40] ^= 1;
    let e = Reader::from_bytes(bad).unwrap().get(0).err().unwrap();
    assert!(matches!(&e, TraceError::Checksum { field, .. } if field == "block[0].crc32"), "{e}");
    let mut bad = f.clone();
    let n = bad.len();
    bad[n - 30] ^= 0x10; // inside the index
    assert!(matches!(Reader::from_bytes(bad).err().unwrap(), TraceError::Checksum { .. }));
}

/// Re-seals a block body after editing it (so the CRC passes and the parser sees the edit).
fn reseal(block: &mut [u8]) {
    let n = block.len();
    let crc = crc32(&block[12..n - 4]);
    block[n - 4..].copy_from_slice(&crc.to_le_bytes());
}

fn crc32(b: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &x in b {
        c ^= x as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0xedb8_8320 } else { c >> 1 };
        }
    }
    !c
}

#[test]
fn expert_out_of_range_and_shape_errors_name_the_field() {
    // plain codec, then lower num_experts below a stored id
    let t = make(&Spec { e: 65535, k: 8, ..Spec::default() });
    let mut b = encode_block(&t);
    let max = *t.ids().iter().max().unwrap() as u32;
    b[12..16].copy_from_slice(&max.to_le_bytes()); // num_experts = max id (so that id is out of range)
    reseal(&mut b);
    assert!(max > 32768, "same bit width needed for this test");
    let e = decode_block(&b, "block[0]", DecodeLimits::default()).err().unwrap();
    assert!(matches!(&e, TraceError::ExpertOutOfRange { field, .. } if field.starts_with("block[0].ids")), "{e}");
    // subset codec: a row code past C(E, k)
    let t = make(&Spec { e: 16, k: 4, ordered: false, tokens: 1, layers: vec![0], ..Spec::default() });
    let mut b = encode_block(&t);
    let n = b.len();
    // ids are the last bytes before probs_len (8) and crc (4): C(16,4) = 1820 < 2^11, 2 bytes
    b[n - 4 - 8 - 2..n - 4 - 8].copy_from_slice(&0x07ffu16.to_le_bytes());
    reseal(&mut b);
    let e = decode_block(&b, "block[0]", DecodeLimits::default()).err().unwrap();
    assert!(
        matches!(&e, TraceError::ExpertOutOfRange { field, id, .. } if field.starts_with("block[0].ids") && *id >= 16),
        "{e}"
    );
    // ids stream length that disagrees with the header
    let t = make(&Spec::default());
    let mut b = encode_block(&t);
    b[12 + 8..12 + 12].copy_from_slice(&(t.num_tokens() as u32 + 1).to_le_bytes()); // num_tokens + 1
    reseal(&mut b);
    let e = decode_block(&b, "block[0]", DecodeLimits::default()).err().unwrap();
    assert!(e.field().starts_with("block[0]"), "{e}");
    // a block claiming a huge shape is refused before allocating
    let mut b = encode_block(&make(&Spec { missing: (0..9).collect(), ..Spec::default() }));
    b[12 + 4..12 + 8].copy_from_slice(&60000u32.to_le_bytes()); // top_k
    b[12..16].copy_from_slice(&65535u32.to_le_bytes());
    reseal(&mut b);
    let e = decode_block(&b, "block[0]", DecodeLimits { max_ids: 1 << 20 }).err().unwrap();
    assert!(e.field().starts_with("block[0]"), "{e}");
}

#[test]
fn constructor_rejects_bad_input_with_field_names() {
    let m = TraceMeta::top_k(8, 2);
    let err = |r: Result<lockstep_trace::RouteTrace, TraceError>| r.expect_err("must fail").field().to_string();
    use lockstep_trace::RouteTrace as T;
    assert_eq!(err(T::new(m.clone(), vec![0], 2, vec![0, 1, 2], vec![false; 2], None)), "ids");
    assert!(err(T::new(m.clone(), vec![0], 1, vec![0, 8], vec![false], None)).starts_with("ids[token 0]"));
    assert!(err(T::new(m.clone(), vec![0], 1, vec![3, 3], vec![false], None)).starts_with("ids[token 0]"));
    assert_eq!(err(T::new(m.clone(), vec![2, 1], 1, vec![0, 1, 2, 3], vec![false], None)), "layers");
    assert_eq!(err(T::new(m.clone(), vec![0], 1, vec![0, 1], vec![], None)), "missing");
    let mut m2 = m.clone();
    m2.prompt_len = 5;
    assert_eq!(err(T::new(m2, vec![0], 1, vec![0, 1], vec![false], None)), "meta.prompt_len");
    assert_eq!(err(T::new(TraceMeta::top_k(0, 1), vec![0], 1, vec![0], vec![false], None)), "meta.num_experts");
    assert!(err(T::from_u32(m.clone(), vec![0], 1, &[0, 70000], vec![false], None)).starts_with("ids["));
    // missing rows may hold anything and come back as MISSING / ROUTE_FREE
    let t = T::from_u32(m.clone(), vec![0], 2, &[1, 0, u32::MAX, u32::MAX], vec![false, true], None).unwrap();
    assert_eq!(t.row(1, 0), None);
    assert_eq!(t.ids_u32().unwrap(), vec![1, 0, lockstep_trace::ROUTE_FREE, lockstep_trace::ROUTE_FREE]);
    assert_eq!(t.row_u32(0, 0), Some(vec![1, 0]));
}

#[test]
fn policy_staleness() {
    let t = make(&Spec::default()); // version 42, fingerprint 0xfeedbeef
    t.check_policy(42, 0xfeed_beef).unwrap();
    let e = t.check_policy(43, 0xfeed_beef).err().unwrap();
    assert_eq!(e.field(), "meta.policy_version");
    let e = t.check_policy(42, 1).err().unwrap();
    assert_eq!(e.field(), "meta.fingerprint");
    t.check_policy_within(44, 2, 0xfeed_beef).unwrap();
    assert!(t.check_policy_within(45, 2, 0xfeed_beef).is_err());
    assert!(t.check_policy_within(41, 2, 0xfeed_beef).is_err());
    assert_ne!(lockstep_trace::fingerprint_of(b"{}"), lockstep_trace::fingerprint_of(b"{ }"));
}

#[test]
fn stats_histogram_max_vio_missing() {
    use lockstep_trace::stats::TraceStats;
    let m = TraceMeta::top_k(4, 2);
    // layer 5: experts 0,1 every token; 3 present tokens, 1 missing
    let ids = [0u16, 1, 0, 1, 9, 9, 1, 0];
    let t = lockstep_trace::RouteTrace::new(
        m,
        vec![5],
        4,
        ids.iter().map(|&x| if x == 9 { 0 } else { x }).collect(),
        vec![false, false, true, false],
        None,
    )
    .unwrap();
    let mut s = TraceStats::new();
    s.add(&t);
    assert_eq!(s.missing_rows, 1);
    assert_eq!(s.tokens, 4);
    let l = s.layers().next().unwrap();
    assert_eq!(l.layer, 5);
    assert_eq!(l.counts, vec![3, 3, 0, 0]);
    // mean 1.5, max 3 -> (3 - 1.5) / 1.5 = 1
    assert!((l.max_vio() - 1.0).abs() < 1e-12);
    assert!((s.max_vio_max() - 1.0).abs() < 1e-12);
}

/// Fuzz finding: a CRC-sealed body with zero MoE layers and a missing token panicked in the
/// scatter of decoded rows (`chunks_exact(0)`).
#[test]
fn fuzz_regression_zero_layers_with_missing_tokens() {
    let input: &[u8] = &[
        0x97, 0xae, 0x0, 0x0, 0x1, 0x0, 0x0, 0x0, 0x6, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x1, 0x0, 0x1, 0x1, 0x0,
        0xed, 0x57, 0x0, 0x0, 0x3e, 0x41, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x3, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x38, 0x0,
        0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0,
    ];
    let mut block = b"LSQB".to_vec();
    block.extend_from_slice(&(input.len() as u64).to_le_bytes());
    block.extend_from_slice(input);
    block.extend_from_slice(&crc32(input).to_le_bytes());
    let _ = decode_block(&block, "b", DecodeLimits { max_ids: 1 << 20 }); // Ok or Err, never a panic
                                                                          // and the shape itself round-trips
    rt(&make(&Spec { layers: vec![], missing: vec![0, 3], ..Spec::default() }));
}
