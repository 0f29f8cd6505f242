// xsedehub-jobext: the SLURM job's time left in JupyterLab's status bar, and a warning
// (a notification) as the job's end comes near.  The time left comes from this server's
// own extension (GET <base>/xsedehub/walltime), which asks the hub: the hub follows
// SLURM (squeue's time left, refreshed every poll interval), so an extension of the job
// shows here too.  Only seconds left travel, never clock times: no time zone, and no
// skew between the browser's, the hub's and the cluster's clocks.
import { Notification } from '@jupyterlab/apputils';
import { ServerConnection } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Widget } from '@lumino/widgets';

const PLUGIN_ID = 'xsedehub-jobext:walltime';
const REFRESH_MS = 30000;

/** "1:02:03" / "12:03" from seconds (never negative). */
export function formatLeft(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${ss}` : `${m}:${ss}`;
}

/** The most urgent warning threshold (seconds) crossed and not yet shown, or null. */
export function dueWarning(left, thresholds, shown) {
  let due = null;
  for (const t of thresholds) {
    if (left <= t && !shown.has(t) && (due === null || t < due)) {
      due = t;
    }
  }
  return due;
}

function minutesText(seconds) {
  const m = Math.max(1, Math.round(seconds / 60));
  return m === 1 ? '1 minute' : `${m} minutes`;
}

class WalltimeItem extends Widget {
  constructor() {
    super();
    this.addClass('xh-walltime');
    this.id = 'xh-walltime';
    this.node.title = 'Time left before SLURM ends this job (its walltime)';
  }
  show(text, urgent) {
    this.node.textContent = text;
    this.node.classList.toggle('xh-walltime-urgent', urgent);
  }
}

const plugin = {
  id: PLUGIN_ID,
  description: 'The SLURM job time left, with warnings before the walltime',
  autoStart: true,
  requires: [IStatusBar],
  activate: (app, statusBar) => {
    const settings = ServerConnection.makeSettings();
    const url = settings.baseUrl + 'xsedehub/walltime';
    const item = new WalltimeItem();
    statusBar.registerStatusItem(PLUGIN_ID, {
      item,
      align: 'left',
      rank: 1000,
      isActive: () => true
    });
    let endAt = null; // this browser's clock, ms
    let thresholds = [];
    let extendMinutes = 0; // what one extension adds; 0: not allowed here
    const shown = new Set();

    function extendActions() {
      if (!extendMinutes) {
        return [];
      }
      return [
        {
          label: `Extend by ${extendMinutes} min`,
          caption: 'Ask SLURM for more time for this job',
          callback: () => void extend()
        }
      ];
    }

    async function extend() {
      const id = Notification.emit('Asking SLURM for more time...', 'in-progress', {
        autoClose: false
      });
      try {
        const r = await ServerConnection.makeRequest(
          url,
          { method: 'POST', body: '{}' },
          settings
        );
        const w = r.ok ? await r.json() : { ok: false, message: `${r.status} ${r.statusText}` };
        if (r.ok) {
          apply(w);
        }
        const left =
          endAt === null ? '' : ` The job now ends in ${formatLeft((endAt - Date.now()) / 1000)}.`;
        Notification.update({
          id,
          message: w.ok ? `Extended: ${w.message}.${left}` : `Not extended: ${w.message}`,
          type: w.ok ? 'success' : 'error',
          autoClose: w.ok ? 10000 : false
        });
      } catch (e) {
        Notification.update({ id, message: `Not extended: ${e}`, type: 'error', autoClose: false });
      }
    }

    item.node.addEventListener('click', () => {
      if (endAt !== null && extendMinutes) {
        Notification.info(
          `This job ends in ${formatLeft((endAt - Date.now()) / 1000)} (SLURM walltime).`,
          { autoClose: 10000, actions: extendActions() }
        );
      }
    });

    async function refresh() {
      try {
        const r = await ServerConnection.makeRequest(url, {}, settings);
        if (!r.ok) {
          return;
        }
        apply(await r.json());
      } catch (e) {
        console.warn('xsedehub-jobext: no walltime from the server', e);
      }
    }

    function apply(w) {
      extendMinutes = Number(w.extend || 0);
      thresholds = (w.warnings || []).map(Number);
      if (typeof w.seconds_left === 'number') {
        const next = Date.now() + w.seconds_left * 1000;
        if (endAt !== null && next - endAt > 60000) {
          // the job was extended: warnings start over
          shown.clear();
        }
        endAt = next;
      } else {
        endAt = null;
      }
      tick();
    }

    function tick() {
      if (endAt === null) {
        item.show('', false);
        return;
      }
      const left = (endAt - Date.now()) / 1000;
      const urgent = thresholds.length > 0 && left <= Math.min(...thresholds);
      item.show(`Job ends in ${formatLeft(left)}`, urgent);
      const due = dueWarning(left, thresholds, shown);
      if (due !== null) {
        for (const t of thresholds) {
          if (t >= due) {
            shown.add(t);
          }
        }
        Notification.warning(
          `Your job reaches its walltime in about ${minutesText(left)}: SLURM then ` +
            'stops this server. Save your work now.',
          { autoClose: false, actions: extendActions() }
        );
      }
    }

    void refresh();
    setInterval(tick, 1000);
    setInterval(() => void refresh(), REFRESH_MS);
  }
};

export default plugin;
