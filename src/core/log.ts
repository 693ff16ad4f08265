/**
 * Leveled logging to stderr. One line per event: `nbdd[pid] LEVEL area: message`.
 * The level comes from `--log-level` / `NBDD_LOG` (error, warn, info, debug); default `info`.
 */
export const LogLevels = ['error', 'warn', 'info', 'debug'] as const;
export type LogLevel = (typeof LogLevels)[number];

let threshold = LogLevels.indexOf((process.env.NBDD_LOG as LogLevel) ?? 'info');
if (threshold < 0) threshold = 2;

export function setLogLevel(level: LogLevel): void {
  threshold = LogLevels.indexOf(level);
}

export function isLogEnabled(level: LogLevel): boolean {
  return LogLevels.indexOf(level) <= threshold;
}

export interface Logger {
  error(message: string): void;
  warn(message: string): void;
  info(message: string): void;
  debug(message: string): void;
}

export function logger(area: string): Logger {
  const emit = (level: LogLevel, message: string): void => {
    if (LogLevels.indexOf(level) > threshold) return;
    process.stderr.write(`nbdd[${process.pid}] ${level.toUpperCase()} ${area}: ${message}\n`);
  };
  return {
    error: (m) => emit('error', m),
    warn: (m) => emit('warn', m),
    info: (m) => emit('info', m),
    debug: (m) => emit('debug', m),
  };
}
