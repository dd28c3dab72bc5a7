//! Where a trainer step's time goes, phase by phase (`TrainerConfig::time_phases`, for
//! benchmarks): at each phase's end the device is synchronised and the wall time since the
//! previous mark is added to the phase. Off (the default) it does nothing — no synchronisation,
//! no clock read — so a step's arithmetic and speed are those of an untimed one.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Device;

use crate::error::Result;

/// Seconds per phase, summed over a step's micro-batches.
pub type PhaseSeconds = BTreeMap<&'static str, f64>;

/// The clock of one step ([module doc](self)).
pub struct PhaseTimer {
    device: Option<Device>,
    last: Instant,
    pub secs: PhaseSeconds,
}

impl PhaseTimer {
    /// A timer for work on `device`; `on = false` makes every mark a no-op.
    pub fn new(device: &Device, on: bool) -> Self {
        Self { device: on.then(|| device.clone()), last: Instant::now(), secs: PhaseSeconds::new() }
    }

    /// The timer that records nothing.
    pub fn off() -> Self {
        Self { device: None, last: Instant::now(), secs: PhaseSeconds::new() }
    }

    /// End `phase` here: wait for the device, add the time since the last mark.
    pub fn mark(&mut self, phase: &'static str) -> Result<()> {
        let Some(dev) = &self.device else { return Ok(()) };
        dev.synchronize()?;
        let now = Instant::now();
        *self.secs.entry(phase).or_default() += (now - self.last).as_secs_f64();
        self.last = now;
        Ok(())
    }

    /// Restart the clock without charging any phase (time between steps).
    pub fn restart(&mut self) -> Result<()> {
        if let Some(dev) = &self.device {
            dev.synchronize()?;
            self.last = Instant::now();
        }
        Ok(())
    }
}
