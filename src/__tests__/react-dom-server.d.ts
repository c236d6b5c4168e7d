/** The one function of react-dom/server the panel's tests use (the project has no @types/react-dom). */
declare module 'react-dom/server' {
  import { ReactElement } from 'react';
  export function renderToStaticMarkup(element: ReactElement): string;
}
