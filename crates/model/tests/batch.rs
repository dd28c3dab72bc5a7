//! Packed and padded batches compute the same thing as separate sequences: no attention across
//! sequence boundaries, positions restart per sequence, padding changes nothing real.

use candle_core::{DType, Device, IndexOp, Tensor};
use lockstep_model::parity::rel_error;
use lockstep_model::{Batch, MoeCausalLm, RoutingPlan};

fn seqs() -> Vec<Vec<u32>> {
    vec![(0..11).map(|i| (i * 5 + 3) % 256).collect(), (0..6).map(|i| (i * 9 + 1) % 256).collect(), (0..8).map(|i| (i * 31 + 7) % 256).collect()]
}

fn alone(model: &MoeCausalLm, s: &[u32]) -> Tensor {
    let b = Batch::from_sequences(&[s.to_vec()], 0, &Device::Cpu).unwrap();
    model.forward(&b, &RoutingPlan::compute()).unwrap().logits.i(0).unwrap()
}

#[test]
fn packed_row_equals_separate_sequences() {
    let model = MoeCausalLm::embedded_default(5, DType::F32, &Device::Cpu).unwrap();
    let s = seqs();
    let tokens: Vec<u32> = s.concat();
    let mut cu = vec![0usize];
    for x in &s {
        cu.push(cu.last().unwrap() + x.len());
    }
    // two padding slots at the end
    let mut padded_tokens = tokens.clone();
    padded_tokens.extend([0, 0]);
    let b = Batch::packed(&padded_tokens, None, &cu, &Device::Cpu).unwrap();
    assert_eq!(&b.positions()[9..13], &[9, 10, 0, 1]);
    let out = model.forward(&b, &RoutingPlan::record()).unwrap();
    for (i, x) in s.iter().enumerate() {
        let ours = out.logits.i((0, cu[i]..cu[i + 1])).unwrap();
        let (_, rel) = rel_error(&ours, &alone(&model, x)).unwrap();
        assert!(rel < 1e-5, "sequence {i}: rel {rel}");
    }
    // routes align with tokens: packed route rows equal the separate runs' rows
    let b0 = Batch::from_sequences(&[s[1].clone()], 0, &Device::Cpu).unwrap();
    let r0 = model.forward(&b0, &RoutingPlan::record()).unwrap();
    let packed_rows: Vec<u32> = out.routes[&3].ids_NK().unwrap().narrow(0, cu[1], s[1].len()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let alone_rows: Vec<u32> = r0.routes[&3].ids_NK().unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(packed_rows, alone_rows);
}

#[test]
fn left_and_right_padding_equal_unpadded() {
    let model = MoeCausalLm::embedded_default(6, DType::F32, &Device::Cpu).unwrap();
    let s = seqs();
    let t = 11;
    let right = Batch::from_sequences(&s, 0, &Device::Cpu).unwrap();
    let out_r = model.forward(&right, &RoutingPlan::compute()).unwrap();
    let ids: Vec<Vec<u32>> = s.iter().map(|x| std::iter::repeat_n(0, t - x.len()).chain(x.iter().copied()).collect()).collect();
    let mask: Vec<Vec<u8>> = s.iter().map(|x| (0..t).map(|i| u8::from(i >= t - x.len())).collect()).collect();
    let left = Batch::padded(&ids, &mask, &Device::Cpu).unwrap();
    let out_l = model.forward(&left, &RoutingPlan::compute()).unwrap();
    assert!(out_l.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite()));
    for (i, x) in s.iter().enumerate() {
        let reference = alone(&model, x);
        let (_, rr) = rel_error(&out_r.logits.i((i, 0..x.len())).unwrap(), &reference).unwrap();
        let (_, rl) = rel_error(&out_l.logits.i((i, t - x.len()..t)).unwrap(), &reference).unwrap();
        assert!(rr < 1e-5 && rl < 1e-5, "sequence {i}: right {rr} left {rl}");
    }
}
