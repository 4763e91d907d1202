// Why this file exists: which backups a retention policy keeps — a pure function, unit-tested.
// As in Proxmox: --keep-last N keeps the N newest; --keep-daily N keeps the newest backup of each
// of the N most recent days that have one (UTC days). A backup kept by either rule stays. The
// newest backup is always kept: it is the base the next incremental reads against.
export interface Retention {
  keepLast?: number;
  keepDaily?: number;
}

export function selectKept<T extends { id: string; created: number }>(backups: T[], r: Retention): { keep: T[]; remove: T[] } {
  const sorted = [...backups].sort((a, b) => b.created - a.created);
  const keep = new Set<string>();
  if (sorted[0]) keep.add(sorted[0].id);
  for (const b of sorted.slice(0, r.keepLast ?? 0)) keep.add(b.id);
  if (r.keepDaily) {
    const days = new Set<string>();
    for (const b of sorted) {
      const day = new Date(b.created).toISOString().slice(0, 10);
      if (days.has(day)) continue;
      if (days.size >= r.keepDaily) break;
      days.add(day);
      keep.add(b.id);
    }
  }
  return { keep: sorted.filter((b) => keep.has(b.id)), remove: sorted.filter((b) => !keep.has(b.id)) };
}
