//! Business hours: weekly opening windows and holidays in one IANA time zone.
//!
//! A schedule is evaluated at a UTC instant converted to its own zone (`chrono-tz`), so
//! daylight-saving changes move the opening hours with the local clock: "08:00–20:00
//! Europe/London" is 07:00–19:00 UTC in summer and 08:00–20:00 UTC in winter. Holidays
//! are local calendar dates and win over the weekly hours. Pure: no clock, no I/O.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike as _, NaiveDate, NaiveTime, Timelike as _, Utc, Weekday};
use chrono_tz::Tz;

/// Whether a schedule is open at an instant, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Openness {
    /// Inside an opening window and not a holiday.
    Open,
    /// Closed: `outside-hours`, or `holiday:<name>`.
    Closed {
        /// The reason as carried by `CallClosed::reason`.
        reason: String,
    },
}

/// One opening window on a weekday, in minutes since local midnight (`close` may be
/// 1440, the end of the day).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Day of the week.
    pub day: Weekday,
    /// Opening minute (inclusive).
    pub open_minute: u32,
    /// Closing minute (exclusive).
    pub close_minute: u32,
}

/// Validated business hours of one site or line.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// The schedule's name, as rules refer to it.
    pub name: String,
    /// Its time zone.
    pub tz: Tz,
    /// Opening windows; a day without a window is closed all day.
    pub windows: Vec<Window>,
    /// Holidays by local date, with their names.
    pub holidays: BTreeMap<NaiveDate, String>,
    /// What to play or do when closed, unless the rule says otherwise.
    pub closed_treatment: Option<String>,
}

impl Schedule {
    /// Whether the schedule is open at `now`.
    #[must_use]
    pub fn openness(&self, now: DateTime<Utc>) -> Openness {
        let local = now.with_timezone(&self.tz);
        if let Some(name) = self.holidays.get(&local.date_naive()) {
            return Openness::Closed {
                reason: format!("holiday:{name}"),
            };
        }
        let minute = local.hour() * 60 + local.minute();
        let day = local.weekday();
        let open = self
            .windows
            .iter()
            .any(|w| w.day == day && w.open_minute <= minute && minute < w.close_minute);
        if open {
            Openness::Open
        } else {
            Openness::Closed {
                reason: "outside-hours".into(),
            }
        }
    }
}

/// Parse `mon` … `sun` (also full English names), case-insensitively.
pub(crate) fn parse_day(text: &str) -> Option<Weekday> {
    let day = match text.to_ascii_lowercase().as_str() {
        "mon" | "monday" => Weekday::Mon,
        "tue" | "tuesday" => Weekday::Tue,
        "wed" | "wednesday" => Weekday::Wed,
        "thu" | "thursday" => Weekday::Thu,
        "fri" | "friday" => Weekday::Fri,
        "sat" | "saturday" => Weekday::Sat,
        "sun" | "sunday" => Weekday::Sun,
        _ => return None,
    };
    Some(day)
}

/// Parse `HH:MM` into minutes since midnight; `24:00` is accepted as the end of the day.
pub(crate) fn parse_minute(text: &str) -> Option<u32> {
    if text == "24:00" {
        return Some(24 * 60);
    }
    let time = NaiveTime::parse_from_str(text, "%H:%M").ok()?;
    Some(time.hour() * 60 + time.minute())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn london() -> Schedule {
        Schedule {
            name: "uk".into(),
            tz: "Europe/London".parse().unwrap(),
            windows: [Weekday::Mon, Weekday::Tue]
                .into_iter()
                .map(|day| Window {
                    day,
                    open_minute: 8 * 60,
                    close_minute: 20 * 60,
                })
                .collect(),
            holidays: [(
                NaiveDate::from_ymd_opt(2026, 12, 29).unwrap(),
                "closure".to_owned(),
            )]
            .into(),
            closed_treatment: None,
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn opening_hours_follow_the_local_clock_across_daylight_saving() {
        let s = london();
        // Monday 2026-07-06: BST (UTC+1), so 08:00 local is 07:00 UTC.
        assert_eq!(s.openness(at("2026-07-06T07:00:00Z")), Openness::Open);
        assert!(matches!(
            s.openness(at("2026-07-06T06:59:00Z")),
            Openness::Closed { .. }
        ));
        assert!(matches!(
            s.openness(at("2026-07-06T19:00:00Z")),
            Openness::Closed { .. }
        ));
        // Monday 2026-01-05: GMT, so 07:30 UTC is 07:30 local: closed.
        assert!(matches!(
            s.openness(at("2026-01-05T07:30:00Z")),
            Openness::Closed { .. }
        ));
        assert_eq!(s.openness(at("2026-01-05T19:59:00Z")), Openness::Open);
    }

    #[test]
    fn holidays_win_over_weekly_hours_by_local_date() {
        let s = london();
        // Tuesday 2026-12-29 at noon is normally open.
        assert_eq!(
            s.openness(at("2026-12-29T12:00:00Z")),
            Openness::Closed {
                reason: "holiday:closure".into()
            }
        );
    }

    #[test]
    fn days_and_times_parse_with_end_of_day() {
        assert_eq!(parse_day("Fri"), Some(Weekday::Fri));
        assert_eq!(parse_day("sunday"), Some(Weekday::Sun));
        assert_eq!(parse_day("funday"), None);
        assert_eq!(parse_minute("08:30"), Some(510));
        assert_eq!(parse_minute("24:00"), Some(1440));
        assert_eq!(parse_minute("25:00"), None);
        assert_eq!(parse_minute("8am"), None);
    }
}
