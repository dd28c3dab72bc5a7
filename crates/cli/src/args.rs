//! Value flags several commands share, parsed by the libraries' `FromStr` impls; errors name
//! the flag (`--device` is `device::parse`).

use anyhow::anyhow;
use candle_core::DType;
use lockstep_model::config::RoutingStrategy;

/// `--dtype f32|bf16`.
pub fn dtype(s: &str) -> anyhow::Result<DType> {
    lockstep_model::parse_dtype(s).map_err(|e| anyhow!("--dtype {e}"))
}

/// `--routing token-choice|expert-choice`; expert choice takes `--capacity-factor` and `--pool`
/// (read for expert choice only).
pub fn routing(routing: &str, capacity_factor: f64, pool: &str) -> anyhow::Result<RoutingStrategy> {
    Ok(match routing.parse::<RoutingStrategy>().map_err(|e| anyhow!("--routing {e}"))? {
        RoutingStrategy::TokenChoice => RoutingStrategy::TokenChoice,
        RoutingStrategy::ExpertChoice { .. } => {
            RoutingStrategy::ExpertChoice { capacity_factor, pool: pool.parse().map_err(|e| anyhow!("--pool {e}"))? }
        }
    })
}

#[cfg(test)]
mod tests {
    use lockstep_model::config::Pool;

    use super::*;

    #[test]
    fn flags_parse_and_errors_name_the_flag() {
        assert_eq!(dtype("bf16").unwrap(), DType::BF16);
        assert_eq!(dtype("f16").unwrap_err().to_string(), "--dtype `f16`: expected f32 or bf16");
        assert_eq!(routing("expert-choice", 2.0, "block:1").unwrap(), RoutingStrategy::ExpertChoice { capacity_factor: 2.0, pool: Pool::Block(1) });
        // the pool is read for expert choice only
        assert_eq!(routing("token-choice", 2.0, "junk").unwrap(), RoutingStrategy::TokenChoice);
        assert_eq!(routing("expert-choice", 1.0, "junk").unwrap_err().to_string(), "--pool `junk`: expected block:N (N > 0), sequence or batch");
        assert_eq!(routing("topk", 1.0, "batch").unwrap_err().to_string(), "--routing `topk`: expected token-choice or expert-choice");
        assert_eq!(crate::device::parse("tpu").unwrap_err().to_string(), "--device `tpu`: expected cpu, cuda or cuda:N (N a GPU ordinal)");
        assert!(crate::device::parse("cpu").unwrap().is_cpu());
    }
}
