//! A small typed SVG writer and the one chart the bench draws: a target's
//! wake-up lateness over time around one operation, one panel per method.
//! Pure (strings in, a string out); text is plain SVG `<text>` in a
//! generic font family, so nothing here needs fonts or a renderer.

use std::fmt::Write as _;

/// Escape text for SVG content and attribute values.
pub fn escape(text: &str) -> String {
    let mut s = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => s.push_str("&amp;"),
            '<' => s.push_str("&lt;"),
            '>' => s.push_str("&gt;"),
            '"' => s.push_str("&quot;"),
            '\'' => s.push_str("&#39;"),
            c => s.push(c),
        }
    }
    s
}

/// An SVG document being written.
pub struct Svg {
    width: f64,
    height: f64,
    body: String,
}

/// How text is anchored at its point.
#[derive(Debug, Clone, Copy)]
pub enum Anchor {
    Start,
    Middle,
    End,
}

impl Anchor {
    fn name(self) -> &'static str {
        match self {
            Anchor::Start => "start",
            Anchor::Middle => "middle",
            Anchor::End => "end",
        }
    }
}

impl Svg {
    pub fn new(width: f64, height: f64) -> Svg {
        Svg {
            width,
            height,
            body: String::new(),
        }
    }

    pub fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str, stroke: Option<&str>) {
        let stroke = stroke.map_or(String::new(), |s| format!(r#" stroke="{}""#, escape(s)));
        let _ = writeln!(
            self.body,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="{}"{stroke}/>"#,
            escape(fill)
        );
    }

    pub fn line(&mut self, (x1, y1): (f64, f64), (x2, y2): (f64, f64), stroke: &str, width: f64, dash: bool) {
        let dash = if dash { r#" stroke-dasharray="4 3""# } else { "" };
        let _ = writeln!(
            self.body,
            r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="{}" stroke-width="{width}"{dash}/>"#,
            escape(stroke)
        );
    }

    pub fn polyline(&mut self, points: &[(f64, f64)], stroke: &str, width: f64) {
        if points.is_empty() {
            return;
        }
        let mut p = String::new();
        for (x, y) in points {
            let _ = write!(p, "{x:.1},{y:.1} ");
        }
        let _ = writeln!(
            self.body,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="{width}" stroke-linejoin="round"/>"#,
            p.trim_end(),
            escape(stroke)
        );
    }

    pub fn text(&mut self, (x, y): (f64, f64), size: f64, anchor: Anchor, bold: bool, text: &str) {
        let weight = if bold { r#" font-weight="bold""# } else { "" };
        let _ = writeln!(
            self.body,
            r#"<text x="{x:.1}" y="{y:.1}" font-size="{size}" text-anchor="{}"{weight}>{}</text>"#,
            anchor.name(),
            escape(text)
        );
    }

    pub fn finish(self) -> String {
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
             font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{}</svg>\n",
            self.body,
            w = self.width,
            h = self.height
        )
    }
}

/// A linear axis's ticks over `lo..hi`: steps of 1, 2 or 5 × 10^k, about
/// `count` of them.
pub fn linear_ticks(lo: f64, hi: f64, count: usize) -> Vec<f64> {
    if !lo.is_finite() || !hi.is_finite() || hi <= lo || count == 0 {
        return Vec::new();
    }
    let raw = (hi - lo) / count as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + step * 1e-9 {
        // -0.0 prints as "-0".
        out.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    out
}

/// A lateness in µs as people read it: `500 µs`, `10 ms`, `1 s`.
pub fn duration_label(us: f64) -> String {
    let trim = |v: f64| {
        let s = format!("{v:.1}");
        s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
    };
    if us >= 1e6 {
        format!("{} s", trim(us / 1e6))
    } else if us >= 1e3 {
        format!("{} ms", trim(us / 1e3))
    } else {
        format!("{} µs", trim(us))
    }
}

/// One panel: one method's lateness series around its operation.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    /// The operation, in ms from its start: 0..`op_end_ms`.
    pub op_end_ms: f64,
    /// (time ms from the operation's start, worst lateness µs in that bin).
    pub worst: Vec<(f64, f64)>,
    /// (time ms, median lateness µs of that bin).
    pub median: Vec<(f64, f64)>,
    /// The x axis of this panel, ms from the operation's start (each
    /// panel has its own: gdb's operation is 100 times hotpatch's).
    pub x_range: (f64, f64),
    /// Points farther apart than this (ms) are not joined: no wake was due
    /// in between (the threads were stopped).
    pub gap_ms: f64,
}

/// `points` (sorted by x) cut where consecutive ones are more than `gap`
/// apart in x.
pub fn runs(points: &[(f64, f64)], gap: f64) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = Vec::new();
    for &p in points {
        match out.last_mut() {
            Some(run) if run.last().is_some_and(|last| p.0 - last.0 <= gap) => run.push(p),
            _ => out.push(vec![p]),
        }
    }
    out
}

/// The chart: panels stacked, each with its x axis (ms from the
/// operation's start), all on the same log y axis of lateness.
pub fn lateness_chart(title: &str, subtitle: &str, panels: &[Panel]) -> String {
    let (width, left, right) = (900.0, 78.0, 20.0);
    let lines: Vec<&str> = subtitle.lines().collect();
    let (panel_h, gap, bottom) = (150.0, 44.0, 48.0);
    let top = 52.0 + 16.0 * lines.len() as f64;
    let height = top + panels.len() as f64 * (panel_h + gap) - gap + bottom;
    let mut svg = Svg::new(width, height);
    svg.text((width / 2.0, 24.0), 17.0, Anchor::Middle, true, title);
    for (i, line) in lines.iter().enumerate() {
        svg.text(
            (width / 2.0, 44.0 + 16.0 * i as f64),
            12.0,
            Anchor::Middle,
            false,
            line,
        );
    }
    // The y range: 1 µs up to the power of ten above the worst sample.
    let worst = panels
        .iter()
        .flat_map(|p| p.worst.iter().map(|&(_, v)| v))
        .fold(1.0f64, f64::max);
    let y_decades = worst.log10().ceil().max(3.0) as i32;
    let plot_w = width - left - right;
    for (i, panel) in panels.iter().enumerate() {
        let (x0, x1) = panel.x_range;
        let x_of = |t: f64| left + (t.clamp(x0, x1) - x0) / (x1 - x0) * plot_w;
        let y_top = top + i as f64 * (panel_h + gap);
        let y_of = |us: f64| y_top + panel_h - us.max(1.0).log10() / y_decades as f64 * panel_h;
        svg.rect(left, y_top, plot_w, panel_h, "#fbfbfb", Some("#999"));
        // The operation.
        let (a, b) = (x_of(0.0), x_of(panel.op_end_ms).max(x_of(0.0) + 1.5));
        svg.rect(a, y_top, b - a, panel_h, "#fde0dc", None);
        svg.line((a, y_top), (a, y_top + panel_h), "#d33", 1.2, false);
        svg.line((b, y_top), (b, y_top + panel_h), "#d33", 1.2, true);
        for d in 0..=y_decades {
            let us = 10f64.powi(d);
            let y = y_of(us);
            if d > 0 && d < y_decades {
                svg.line((left, y), (left + plot_w, y), "#e2e2e2", 1.0, false);
            }
            svg.text(
                (left - 6.0, y + 4.0),
                11.0,
                Anchor::End,
                false,
                &duration_label(us),
            );
        }
        for t in linear_ticks(x0, x1, 10) {
            let x = x_of(t);
            svg.line(
                (x, y_top + panel_h),
                (x, y_top + panel_h + 4.0),
                "#666",
                1.0,
                false,
            );
            svg.text(
                (x, y_top + panel_h + 16.0),
                11.0,
                Anchor::Middle,
                false,
                &format!("{t}"),
            );
        }
        for (points, colour, width) in [(&panel.median, "#8fb3d9", 1.0), (&panel.worst, "#1f4e8c", 1.3)] {
            let inside: Vec<(f64, f64)> = points
                .iter()
                .copied()
                .filter(|(t, _)| *t >= x0 && *t <= x1)
                .collect();
            for run in runs(&inside, panel.gap_ms) {
                let run: Vec<(f64, f64)> = run.iter().map(|&(t, v)| (x_of(t), y_of(v))).collect();
                if run.len() == 1 {
                    let (x, y) = run[0];
                    svg.line((x - 1.5, y), (x + 1.5, y), colour, width + 1.0, false);
                } else {
                    svg.polyline(&run, colour, width);
                }
            }
        }
        svg.text(
            (left + 6.0, y_top + 15.0),
            13.0,
            Anchor::Start,
            true,
            &panel.title,
        );
    }
    let last = top + panels.len() as f64 * (panel_h + gap) - gap;
    svg.text(
        (left + plot_w / 2.0, last + 36.0),
        12.0,
        Anchor::Middle,
        false,
        "time from the operation's start (ms); shaded: the operation (solid line start, dashed line end)",
    );
    // The y axis title, turned.
    let (cx, cy) = (18.0, top + (last - top) / 2.0);
    let _ = writeln!(
        svg.body,
        r#"<text x="{cx}" y="{cy}" font-size="12" text-anchor="middle" transform="rotate(-90 {cx} {cy})">wake-up lateness (log scale; dark: worst in each bin, light: median)</text>"#
    );
    svg.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            escape(r#"a<b & "c" 'd'>"#),
            "a&lt;b &amp; &quot;c&quot; &#39;d&#39;&gt;"
        );
        let mut s = Svg::new(10.0, 10.0);
        s.text((1.0, 2.0), 10.0, Anchor::Start, false, "gdb <attach>");
        assert!(s.finish().contains(">gdb &lt;attach&gt;</text>"));
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(
            linear_ticks(-100.0, 400.0, 10),
            vec![
                -100.0, -50.0, 0.0, 50.0, 100.0, 150.0, 200.0, 250.0, 300.0, 350.0, 400.0
            ]
        );
        assert_eq!(linear_ticks(0.0, 7.0, 4), vec![0.0, 2.0, 4.0, 6.0]);
        assert!(linear_ticks(5.0, 5.0, 4).is_empty());
        assert!(linear_ticks(0.0, f64::NAN, 4).is_empty());
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(duration_label(1.0), "1 µs");
        assert_eq!(duration_label(100.0), "100 µs");
        assert_eq!(duration_label(1000.0), "1 ms");
        assert_eq!(duration_label(2500.0), "2.5 ms");
        assert_eq!(duration_label(1e6), "1 s");
    }

    #[test]
    fn lines_break_where_no_wake_was_due() {
        let pts = [(0.0, 1.0), (1.0, 1.0), (5.0, 1.0), (6.0, 1.0), (7.0, 1.0)];
        assert_eq!(
            runs(&pts, 2.0).iter().map(Vec::len).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert!(runs(&[], 2.0).is_empty());
    }

    #[test]
    fn chart_has_a_panel_per_method_with_its_operation_marked() {
        let panel = |title: &str, end: f64| Panel {
            title: title.into(),
            op_end_ms: end,
            worst: vec![(-10.0, 50.0), (0.5, 3000.0), (20.0, 40.0)],
            median: vec![(-10.0, 10.0), (0.5, 12.0), (20.0, 9.0)],
            x_range: (-50.0, end + 100.0),
            gap_ms: 100.0,
        };
        let svg = lateness_chart("t", "s", &[panel("hotpatch", 2.0), panel("gdb", 300.0)]);
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert_eq!(
            svg.matches("#fde0dc").count(),
            2,
            "one shaded operation per panel"
        );
        assert!(svg.contains(">hotpatch</text>") && svg.contains(">gdb</text>"));
        assert!(svg.contains(">10 ms</text>"), "log axis labels");
    }
}
