//! Applying the database's change feed to every slot's indexes.

use std::sync::atomic::Ordering;

use super::{CHANGE_ATTEMPTS, CHANGE_BATCH, Engine, types::*};
use crate::index::{NewRow, lock};
use crate::store::{Change, TemplateRow};
use crate::telemetry::metrics;

impl Engine {
    /// Applies every change committed since the last applied one to the
    /// indexes of every slot, in order; returns how many were applied.
    ///
    /// A change that cannot be applied because the database cannot be read
    /// stops the pass (the next one retries; the lag shows in health). One
    /// the index refuses (a stored vector it cannot hold) is tried
    /// [`CHANGE_ATTEMPTS`] times, then reported (an error in the log,
    /// `handid.replication.failed_changes`) and passed over, so it cannot
    /// hold back every later change. Applying removes the subject before it
    /// adds its templates back, so a change passed over never leaves a
    /// deleted subject findable.
    pub async fn apply_changes(&self) -> Result<usize, LoadError> {
        let _one = self.applying.lock().await;
        let mut applied = 0;
        loop {
            let after = self.applied.load(Ordering::SeqCst);
            let changes = self.store.changes_after(after, CHANGE_BATCH).await?;
            if changes.is_empty() {
                return Ok(applied);
            }
            for change in changes {
                match self.apply_change(&change).await {
                    Ok(()) => {}
                    Err(LoadError::Index(error)) => {
                        let attempts = {
                            let mut failing = lock(&self.failing);
                            match &mut *failing {
                                Some((seq, n)) if *seq == change.seq => *n += 1,
                                other => *other = Some((change.seq, 1)),
                            }
                            failing.map_or(1, |(_, n)| n)
                        };
                        if attempts < CHANGE_ATTEMPTS {
                            return Err(LoadError::Index(error));
                        }
                        metrics().change_failed();
                        tracing::error!(
                            seq = change.seq,
                            kind = %change.kind,
                            gallery = %change.gallery_id,
                            subject = ?change.subject_id,
                            attempts,
                            %error,
                            "a change keeps failing to apply; passed over (its subject is not searchable here)"
                        );
                    }
                    Err(other) => return Err(other),
                }
                *lock(&self.failing) = None;
                self.applied.store(change.seq, Ordering::SeqCst);
                applied += 1;
            }
        }
    }

    /// Applies every change after `from` to `slot` alone: a slot being
    /// loaded, not yet published, or one writers are held off from (the
    /// caller holds `publishing` exclusively), so no other code touches its
    /// indexes. The caller holds the change lock.
    pub(super) async fn catch_up_slot(&self, slot: &Slot, from: i64) -> Result<(), LoadError> {
        let mut after = from;
        loop {
            let changes = self.store.changes_after(after, CHANGE_BATCH).await?;
            let Some(last) = changes.last().map(|c| c.seq) else {
                return Ok(());
            };
            for change in &changes {
                self.apply_change_to(slot, change).await?;
            }
            after = last;
        }
    }

    /// Makes every slot's index of the change's gallery agree with the
    /// database (see [`Engine::apply_change_to`]), under the gallery's
    /// writer lock.
    async fn apply_change(&self, change: &Change) -> Result<(), LoadError> {
        let writer = self.writer(&change.gallery_id);
        let _serialised = writer.lock().await;
        for slot in self.slots() {
            self.apply_change_to(&slot, change).await?;
        }
        Ok(())
    }

    /// Makes `slot`'s index of the change's gallery agree with the
    /// database: a subject's templates are re-read and replace what the
    /// index holds (so applying a change twice is harmless); a deleted
    /// gallery is emptied.
    async fn apply_change_to(&self, slot: &Slot, change: &Change) -> Result<(), LoadError> {
        match change.subject_id.as_deref() {
            Some(subject) if change.kind == "subject" => {
                let dim = slot.model.embedder.dim();
                let rows = self
                    .store
                    .subject_templates_in_spaces(&change.gallery_id, subject, &slot.spaces, dim)
                    .await?;
                let index = if rows.is_empty() {
                    slot.indexes.get(&change.gallery_id)
                } else {
                    Some(slot.indexes.get_or_create(&change.gallery_id))
                };
                if let Some(index) = index {
                    let new: Vec<NewRow<'_>> = rows.iter().map(TemplateRow::as_new_row).collect();
                    // One critical section: a search never sees the
                    // subject half replaced.
                    let mut index = lock(&index);
                    index.remove_subject(subject)?;
                    index.append(&new)?;
                }
                slot.indexes.forget_if_empty(&change.gallery_id);
            }
            _ => {
                if let Some(index) = slot.indexes.get(&change.gallery_id) {
                    lock(&index).clear();
                }
                slot.indexes.forget_if_empty(&change.gallery_id);
            }
        }
        Ok(())
    }
}
