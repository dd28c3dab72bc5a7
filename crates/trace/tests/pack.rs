//! Packing: pack -> unpack is the identity, route rows stay with their tokens, nothing crosses
//! a sequence boundary, free rows follow the ROUTE_FREE convention.

mod common;
use lockstep_trace::pack::{pack, unpack, PackConfig, Sample};
use lockstep_trace::{ProbDtype, Probs, RouteTrace, TraceMeta, ROUTE_FREE};
use proptest::prelude::*;

const LAYERS: [u32; 3] = [0, 2, 5];
const K: usize = 2;
const E: u32 = 8;

fn sample_strategy() -> impl Strategy<Value = Sample> {
    (0usize..24, any::<u64>(), 0u8..4, proptest::bool::ANY, proptest::bool::ANY).prop_map(
        |(n, seed, route_kind, ordered, last_missing)| {
            let mut rng = common::Rng(seed | 1);
            let tokens: Vec<u32> = (0..n).map(|_| rng.below(50_000) as u32).collect();
            let loss_mask = (0..n).map(|_| rng.below(2) == 1).collect();
            let advantages = (0..n).map(|_| rng.below(1000) as f32 / 7.0 - 50.0).collect();
            let logprobs = (0..n).map(|_| -(rng.below(1000) as f32) / 13.0).collect();
            let routes = (route_kind > 0).then(|| {
                let ids = common::random_ids(&mut rng, n * LAYERS.len(), K, E);
                let missing: Vec<bool> = (0..n).map(|t| (last_missing && t + 1 == n) || rng.below(9) == 0).collect();
                let probs = match route_kind {
                    2 => Some(Probs::from_f32(
                        ProbDtype::Bf16,
                        &(0..ids.len()).map(|i| i as f32 / 64.0).collect::<Vec<_>>(),
                    )),
                    3 => Some(Probs::F32((0..ids.len()).map(|i| 1.0 / (i as f32 + 1.0)).collect())),
                    _ => None,
                };
                let meta = TraceMeta {
                    num_experts: E,
                    top_k: K as u32,
                    prompt_len: (n / 2) as u32,
                    fingerprint: seed,
                    policy_version: 3,
                    ordered,
                };
                RouteTrace::new(meta, LAYERS.to_vec(), n, ids, missing, probs).unwrap()
            });
            Sample { tokens, loss_mask, advantages, logprobs, routes }
        },
    )
}

fn same(a: &Sample, b: &Sample) -> bool {
    a.tokens == b.tokens
        && a.loss_mask == b.loss_mask
        && a.advantages.iter().map(|x| x.to_bits()).eq(b.advantages.iter().map(|x| x.to_bits()))
        && a.logprobs.iter().map(|x| x.to_bits()).eq(b.logprobs.iter().map(|x| x.to_bits()))
        && match (&a.routes, &b.routes) {
            (None, None) => true,
            (Some(x), Some(y)) => x.bits_eq(y),
            _ => false,
        }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn pack_unpack_identity_and_alignment(samples in proptest::collection::vec(sample_strategy(), 0..12), pad in prop_oneof![Just(1usize), Just(4), Just(8)]) {
        let cfg = PackConfig { token_budget: 48, pad_to_multiple: pad, pad_token: 7 };
        let batches = pack(&samples, &cfg).unwrap();
        // identity
        let back = unpack(&batches).unwrap();
        prop_assert_eq!(back.len(), samples.len());
        for (a, b) in samples.iter().zip(&back) {
            prop_assert!(same(a, b));
        }
        let mut seen = vec![0usize; samples.len()];
        for b in &batches {
            let n = b.len();
            prop_assert!(n <= cfg.token_budget);
            prop_assert_eq!(n % pad, 0);
            for v in [b.position_ids.len(), b.loss_mask.len(), b.advantages.len(), b.logprobs.len()] {
                prop_assert_eq!(v, n);
            }
            prop_assert_eq!(b.cu_seqlens.len(), b.sequences.len() + 1);
            prop_assert_eq!(*b.cu_seqlens.last().unwrap() as usize + b.num_padding, n);
            // the batch's routes: one trace over every slot, iff some sample has routes
            prop_assert_eq!(b.routes.is_some(), samples.iter().any(|s| s.routes.is_some()));
            if let Some(r) = &b.routes {
                prop_assert_eq!(r.num_tokens(), n);
                prop_assert_eq!(r.layers(), &LAYERS[..]);
                prop_assert_eq!(r.top_k(), Some(K));
            }
            for (si, s) in b.sequences.iter().enumerate() {
                seen[s.sample] += 1;
                // boundaries: sequence i occupies exactly [cu[i], cu[i+1])
                prop_assert_eq!(b.cu_seqlens[si] as usize, s.start);
                prop_assert_eq!(b.cu_seqlens[si + 1] as usize, s.start + s.len);
                let src = &samples[s.sample];
                for t in 0..s.len {
                    let p = s.start + t;
                    prop_assert_eq!(b.position_ids[p] as usize, t); // restarts per sequence
                    prop_assert_eq!(b.tokens[p], src.tokens[t]);
                    // every route row stays with its token
                    match &src.routes {
                        Some(r) if !r.is_missing(t) => {
                            prop_assert!(!b.is_free(p));
                            let br = b.routes.as_ref().unwrap();
                            for l in 0..LAYERS.len() {
                                prop_assert_eq!(b.route_row(p, l).unwrap(), r.row_u32(t, l).unwrap());
                                if let Some(rp) = r.row_probs(t, l) {
                                    prop_assert_eq!(br.row_probs(p, l).unwrap(), rp);
                                }
                                let ids = br.layer_ids_u32(l).unwrap();
                                prop_assert_eq!(ids[p * K..(p + 1) * K].to_vec(), r.row_u32(t, l).unwrap());
                            }
                        }
                        _ => {
                            prop_assert!(b.is_free(p));
                            if let Some(br) = &b.routes {
                                for l in 0..LAYERS.len() {
                                    prop_assert!(br.layer_ids_u32(l).unwrap()[p * K..(p + 1) * K].iter().all(|&x| x == ROUTE_FREE));
                                }
                            }
                        }
                    }
                }
            }
            // padding: free rows, no loss, outside every sequence
            for p in n - b.num_padding..n {
                prop_assert!(b.is_free(p) && !b.loss_mask[p] && b.tokens[p] == 7 && b.position_ids[p] == 0);
            }
            let unrouted = b.samples_without_routes();
            prop_assert!(unrouted.iter().all(|&i| samples[i].routes.is_none()));
        }
        // every sample packed exactly once
        prop_assert!(seen.iter().all(|&c| c == 1));
    }
}

#[test]
fn first_fit_decreasing_fills_bins() {
    let mk = |n: usize| Sample {
        tokens: vec![1; n],
        loss_mask: vec![true; n],
        advantages: vec![0.0; n],
        logprobs: vec![0.0; n],
        routes: None,
    };
    let samples: Vec<Sample> = [6, 5, 4, 3, 2, 2].iter().map(|&n| mk(n)).collect();
    let b = pack(&samples, &PackConfig { token_budget: 11, pad_to_multiple: 1, pad_token: 0 }).unwrap();
    // FFD: [6,5], [4,3,2,2]
    assert_eq!(b.len(), 2);
    assert_eq!(b.iter().map(|x| x.len()).collect::<Vec<_>>(), vec![11, 11]);
    assert_eq!(b[0].samples_without_routes(), vec![0, 1]);
    assert!(b[0].routes.is_none());
}

#[test]
fn packer_errors_name_the_sample() {
    let cfg = PackConfig { token_budget: 8, pad_to_multiple: 1, pad_token: 0 };
    let mut s = Sample {
        tokens: vec![1; 3],
        loss_mask: vec![true; 2],
        advantages: vec![0.0; 3],
        logprobs: vec![0.0; 3],
        routes: None,
    };
    assert_eq!(pack(&[s.clone()], &cfg).err().unwrap().field(), "sample[0].loss_mask");
    s.loss_mask.push(false);
    let long = Sample {
        tokens: vec![1; 9],
        loss_mask: vec![true; 9],
        advantages: vec![0.0; 9],
        logprobs: vec![0.0; 9],
        routes: None,
    };
    assert_eq!(pack(&[s.clone(), long], &cfg).err().unwrap().field(), "sample[1].tokens");
    // routes over other MoE layers than another sample's
    let a = common::make_variable(3, 2, 8, 1, &[]);
    let b = common::make_variable(3, 3, 8, 2, &[]);
    let (sa, sb) = (Sample { routes: Some(a), ..s.clone() }, Sample { routes: Some(b), ..s.clone() });
    assert_eq!(pack(&[sa, sb], &cfg).err().unwrap().field(), "sample[1].routes");
    // routes with another token count
    let t = common::make(&common::Spec { tokens: 4, ..Default::default() });
    let st = Sample { routes: Some(t), ..s.clone() };
    assert_eq!(pack(&[st], &cfg).err().unwrap().field(), "sample[0].routes");
    assert_eq!(
        pack(&[], &PackConfig { token_budget: 8, pad_to_multiple: 3, pad_token: 0 }).err().unwrap().field(),
        "pad_to_multiple"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    /// Variable-count rows (expert choice over wide pools) pack beside fixed ones: the batch
    /// trace is then variable, every row stays with its token (free rows hold no ids), and
    /// unpacking gives every sample back in its own form.
    #[test]
    fn variable_rows_pack_with_fixed_ones(seeds in proptest::collection::vec((1usize..10, any::<u64>(), proptest::bool::ANY, proptest::bool::ANY), 1..8)) {
        let samples: Vec<Sample> = seeds
            .iter()
            .map(|&(n, seed, variable, routed)| {
                let routes = routed.then(|| {
                    let missing: Vec<usize> = (0..n).filter(|t| (seed >> t) & 3 == 0).collect();
                    if variable {
                        common::make_variable(n, 2, 8, seed, &missing)
                    } else {
                        let mut rng = common::Rng(seed | 1);
                        let ids = common::random_ids(&mut rng, n * 2, 2, 8);
                        let meta = TraceMeta { num_experts: 8, top_k: 2, prompt_len: 0, fingerprint: 1, policy_version: 2, ordered: true };
                        RouteTrace::new(meta, vec![0, 1], n, ids, (0..n).map(|t| missing.contains(&t)).collect(), None).unwrap()
                    }
                });
                Sample { tokens: vec![5; n], loss_mask: vec![true; n], advantages: vec![0.5; n], logprobs: vec![-1.0; n], routes }
            })
            .collect();
        let batches = pack(&samples, &PackConfig { token_budget: 16, pad_to_multiple: 4, pad_token: 0 }).unwrap();
        let any_variable = samples.iter().any(|s| s.routes.as_ref().is_some_and(|r| r.is_variable()));
        for b in &batches {
            if let Some(r) = &b.routes {
                prop_assert_eq!(r.is_variable(), any_variable);
                for s in &b.sequences {
                    for t in 0..s.len {
                        let src = samples[s.sample].routes.as_ref();
                        for l in 0..2 {
                            let want = src.and_then(|x| x.row_u32(t, l));
                            prop_assert_eq!(b.route_row(s.start + t, l), want);
                        }
                    }
                }
            }
        }
        let back = unpack(&batches).unwrap();
        for (a, b) in samples.iter().zip(&back) {
            prop_assert_eq!(a.tokens.clone(), b.tokens.clone());
            match (&a.routes, &b.routes) {
                (Some(x), Some(y)) => prop_assert!(x.bits_eq(y)),
                (None, None) => {}
                _ => prop_assert!(false, "routes lost or invented"),
            }
        }
    }
}
