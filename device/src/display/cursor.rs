//! The cursor queue: `UPDATE_CURSOR` and `MOVE_CURSOR`.

use crate::wire::UpdateCursor;

use super::{Display, DisplayStats, Format, CURSOR_SIZE};

/// The cursor, as the last accepted cursor command left it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CursorInfo {
    /// Scanout.
    pub scanout_id: u32,
    /// Position of the hot spot.
    pub x: u32,
    /// Position of the hot spot.
    pub y: u32,
    /// The resource the image came from (0: hidden).
    pub resource_id: u32,
    /// Hot spot in the image.
    pub hot_x: u32,
    /// Hot spot in the image.
    pub hot_y: u32,
    /// The image's format (`None` when hidden).
    pub format: Option<Format>,
    /// The image: [`CURSOR_SIZE`]² pixels copied at `UPDATE_CURSOR` (empty when hidden).
    pub image: Vec<u8>,
    /// `UPDATE_CURSOR`s accepted.
    pub updates: u64,
    /// `MOVE_CURSOR`s accepted.
    pub moves: u64,
}

/// Cursor commands refused: logged the 1st, 2nd, 4th, … time per kind.
fn cursor_refused(stats: &mut DisplayStats, name: &'static str, reason: &str) {
    stats.cursor_refusals += 1;
    crate::gpu::COMMAND_WARNINGS.warn(name, format_args!("{name}: refused: {reason}"));
}

impl Display {
    /// A cursor-queue command (already parsed): `UPDATE_CURSOR` or `MOVE_CURSOR`.
    pub fn cursor_command(&mut self, c: &UpdateCursor, update: bool) {
        let name = if update {
            "UPDATE_CURSOR"
        } else {
            "MOVE_CURSOR"
        };
        if self.scanout_index(c.pos.scanout_id).is_err() {
            let why = format!(
                "scanout {} (the device has {})",
                c.pos.scanout_id,
                self.scanouts.len()
            );
            cursor_refused(&mut self.stats, name, &why);
            return;
        }
        if update {
            let (format, image) = if c.resource_id == 0 {
                (None, Vec::new())
            } else {
                let Some(res) = self.resources.get(&c.resource_id) else {
                    let why = format!("no 2D resource {}", c.resource_id);
                    cursor_refused(&mut self.stats, name, &why);
                    return;
                };
                if res.width != CURSOR_SIZE || res.height != CURSOR_SIZE {
                    let why = format!(
                        "resource {} is {}x{}, a cursor is {CURSOR_SIZE}x{CURSOR_SIZE}",
                        c.resource_id, res.width, res.height
                    );
                    cursor_refused(&mut self.stats, name, &why);
                    return;
                }
                if c.hot_x >= CURSOR_SIZE || c.hot_y >= CURSOR_SIZE {
                    let why = format!("hot spot ({}, {}) outside the image", c.hot_x, c.hot_y);
                    cursor_refused(&mut self.stats, name, &why);
                    return;
                }
                (Some(res.format), res.data.clone())
            };
            self.cursor.resource_id = c.resource_id;
            self.cursor.hot_x = c.hot_x;
            self.cursor.hot_y = c.hot_y;
            self.cursor.format = format;
            self.cursor.image = image;
            self.cursor.updates += 1;
        } else {
            self.cursor.moves += 1;
        }
        self.cursor.scanout_id = c.pos.scanout_id;
        self.cursor.x = c.pos.x;
        self.cursor.y = c.pos.y;
        self.sink.cursor(&self.cursor);
    }

    /// A cursor-queue command that is neither (logged, counted).
    pub fn cursor_refused(&mut self, name: &'static str, reason: &str) {
        cursor_refused(&mut self.stats, name, reason);
    }
}
